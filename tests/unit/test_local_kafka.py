"""The local broker manager's pure parts."""

from __future__ import annotations

import base64

from streams.kafka.local import new_cluster_id


def test_cluster_ids_never_look_like_an_option_to_the_storage_tool():
    ids = [new_cluster_id() for _ in range(2000)]  # one in 64 random ids starts with "-"
    assert not any(cid.startswith("-") for cid in ids)
    assert len(set(ids)) == len(ids)
    assert all(len(base64.urlsafe_b64decode(cid + "==")) == 16 for cid in ids)
