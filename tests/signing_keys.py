"""Model signing keys for the tests, made as `make env` makes them."""


def signing_key_pair():
    """A fresh ECDSA P-256 pair as `make env` writes it: each PEM as one base64 line."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"MODEL_SIGNING_KEY": base64.b64encode(private).decode(),
            "MODEL_SIGNING_PUBLIC_KEY": base64.b64encode(public).decode()}
