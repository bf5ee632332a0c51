"""Mosquitto: the launcher, the secure set-up (users, ACL, TLS) and the configs beside them."""
