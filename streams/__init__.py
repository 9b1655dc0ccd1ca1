"""The Faust app and all Kafka I/O; no detection logic lives here."""
