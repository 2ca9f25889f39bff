from __future__ import annotations

import pytest
from pydantic import ValidationError

from retrieval import EdgeStore, QdrantServerStore, StoreSettings, collection_spec, open_store


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDSTORE_PATH", str(tmp_path / "s"))
    monkeypatch.setenv("EMBEDSTORE_SHORTLIST", "250")
    monkeypatch.setenv("EMBEDSTORE_COLLECTION", "emoji")
    monkeypatch.setenv("EMBEDSTORE_API_KEY", "secret-key")
    s = StoreSettings()
    assert (s.backend, s.shortlist, s.collection) == ("edge", 250, "emoji")
    assert "secret-key" not in repr(s)  # secrets never printed
    with open_store(s) as store:
        assert isinstance(store, EdgeStore) and store.shortlist == 250
        assert store.path == tmp_path / "s"


def test_server_backend_needs_a_url(monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_BACKEND", "server")
    with pytest.raises(ValidationError, match="EMBEDSTORE_URL"):
        StoreSettings()


@pytest.mark.parametrize(
    ("var", "value"),
    [("EMBEDSTORE_BACKEND", "faiss"), ("EMBEDSTORE_SHORTLIST", "0"), ("EMBEDSTORE_COLLECTION", "bad name")],
)
def test_bad_settings_are_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        StoreSettings()


def test_open_store_with_overrides_builds_the_server_adapter():
    store = open_store(StoreSettings(), backend="server", url=":memory:")
    try:
        assert isinstance(store, QdrantServerStore) and store.local
    finally:
        store.close()


def test_collection_spec_carries_cluster_settings():
    spec = collection_spec(StoreSettings(shard_number=6, replication_factor=2))
    assert (spec.shard_number, spec.replication_factor) == (6, 2)


def test_an_unreachable_server_names_the_grpc_port_that_was_dialled(monkeypatch):
    from retrieval import StoreUnavailableError

    monkeypatch.setenv("EMBEDSTORE_QDRANT_GRPC_PORT", "9")  # discard: nothing listens
    settings = StoreSettings(backend="server", url="http://127.0.0.1:6333", timeout=2)
    assert settings.qdrant_grpc_port == 9
    with open_store(settings) as store, pytest.raises(StoreUnavailableError, match=r"gRPC port 9\)") as err:
        store.list_collections()
    assert "127.0.0.1:9" in str(err.value)  # the port qdrant-client dialled is the one named
    # a password in the URL stays out of every message (it went to the log, the CLI and gRPC callers)
    secret = StoreSettings(backend="server", url="http://admin:UrlPw123@127.0.0.1:6333", timeout=2)
    with open_store(secret) as store, pytest.raises(StoreUnavailableError) as err:
        store.list_collections()
    assert "UrlPw123" not in str(err.value) and "admin:***@127.0.0.1:6333" in str(err.value)
    assert "UrlPw123" not in store.target
    from retrieval.config import safe_url

    assert safe_url("http://admin:pw@[::1]:6333/x") == "http://admin:***@[::1]:6333/x"  # brackets kept
    assert safe_url("redis://:pw@h:6379/0?password=pw2&db=1") == "redis://:***@h:6379/0?password=***&db=1"


def test_server_settings_refuse_what_would_turn_auth_or_tls_off_silently(tmp_path):
    """EMBEDSTORE_GRPC_TOKENS="," parsed as no token (auth silently off) and a JSON list kept its brackets
    in the tokens; a key that does not match its certificate failed later as "cannot bind gRPC port"."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from embedder.config import ServerSettings
    from embedder.environment import is_loopback

    assert [t.get_secret_value() for t in ServerSettings(tokens="a-1, b_2==, p@ss!").tokens] == [
        "a-1",
        "b_2==",
        "p@ss!",
    ]
    assert ServerSettings(tokens="").tokens == []
    for bad, says in (
        (",", "holds no token"),
        (", ,", "holds no token"),
        ('["a","b"]', "without spaces, quotes or brackets"),
    ):
        with pytest.raises(ValidationError, match=says):
            ServerSettings(tokens=bad)

    def pem_pair(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return tmp_path / f"{name}.crt", tmp_path / f"{name}.key"

    cert_a, key_a = pem_pair("a")
    _, key_b = pem_pair("b")
    assert ServerSettings(tls_cert=cert_a, tls_key=key_a).tls_cert == cert_a
    with pytest.raises(ValidationError, match="cannot be used: they must be a PEM certificate chain and its matching"):
        ServerSettings(tls_cert=cert_a, tls_key=key_b)
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ValidationError, match="cannot be used"):
        ServerSettings(tls_cert=cert_a, tls_key=tmp_path / "junk.key")
    # every loopback address keeps the web page's Host check and silences the no-token warning
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "example.com"))


def test_the_server_log_level_is_a_setting():
    from embedder.config import ServerSettings

    assert ServerSettings().log_level == "INFO" and ServerSettings(log_level=" debug ").log_level == "DEBUG"
    with pytest.raises(ValueError, match="log_level"):
        ServerSettings(log_level="verbose")
