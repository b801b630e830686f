"""DKIM signing of outbound mail (RFC 6376, Ed25519 per RFC 8463): select.py decides which key
signs a message (pure), sign.py computes signatures with `cryptography`, keys.py loads, makes and
checks keys, signer.py ties them to the configuration."""
