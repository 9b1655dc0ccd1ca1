"""``round(x, digits)`` of a float, as Python rounds it, without Python's decimal conversion.

A risk score rounds ~15 numbers (scores, reasons' weights). Python's ``round(x, 6)``
finds the decimal digits of ``x``'s exact binary value (a printf-like conversion) and
reads them back (a strtod): ~3,300 instructions a call, a sixth of ``score_many``
(docs/performance.md, round 18). ``rounded`` gets the same double with a product, a
floor and a division, and leaves to ``round`` the rare numbers where those could differ.

>>> rounded(0.1234565, 6) == round(0.1234565, 6), rounded(2.675, 2), rounded(-1e-9, 6)
(True, 2.67, -0.0)
"""

from __future__ import annotations

import cython
from cython.cimports.libc.math import copysign, fabs, floor

_MOST_DIGITS = 15
_POWERS_OF_TEN = cython.declare(cython.double[16], [10.0 ** digits for digits in range(_MOST_DIGITS + 1)])
_EXACT_INTEGERS = cython.declare(cython.double, 2.0 ** 52)


@cython.ccall
@cython.locals(x=cython.double, digits=cython.int, scale=cython.double, scaled=cython.double,
               whole=cython.double, fraction=cython.double)
def rounded(x, digits) -> float:
    """``round(float(x), digits)`` for a number ``x`` (0 <= ``digits`` <= 15), the same double.

    Python rounds the exact value of ``x`` to ``digits`` decimals, half to even, and returns
    the double nearest that decimal. Here ``|x|·10^digits`` is computed in a double. Below
    2^52 each halfway point (an integer and a half) is a double itself, and rounding to the
    nearest double never passes a double, so the product's double lies on the same side of
    every halfway point as the exact product, or on one: the nearest integer is the exact
    product's unless the double is a halfway point, which ``round`` then decides. That
    integer divided by ``10^digits`` (both exact) is the double nearest the decimal, as IEEE
    division rounds the exact quotient. The sign is ``x``'s: -1e-9 gives -0.0, as in ``round``.
    """
    if not cython.compiled or digits < 0 or digits > _MOST_DIGITS:
        return round(float(x), digits)  # float: a numpy number would round to a numpy number
    scale = _POWERS_OF_TEN[digits]
    scaled = fabs(x) * scale
    if not scaled < _EXACT_INTEGERS:  # too large to have decimals to round, infinite or NaN
        return round(x, digits)
    whole = floor(scaled)
    fraction = scaled - whole  # exact: both are below 2^52 and whole is scaled's integer part
    if fraction == 0.5:  # the exact product may be a tie, or just either side of one
        return round(x, digits)
    if fraction > 0.5:
        whole += 1.0
    return copysign(whole / scale, x)
