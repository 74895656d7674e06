"""TLS for the hub's WebSocket listener: a server SSL context from PEM files, reloadable in place."""

from __future__ import annotations

import hashlib
import logging
import ssl
from pathlib import Path

from hub.config import TLSConfig

__all__ = ["ServerTLS", "TLSError", "certificate_fingerprint", "check_tls_files"]

log = logging.getLogger("hub.tls")


class TLSError(Exception):
    """The certificate or key cannot be loaded (the message names the files and the reason)."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, blocking the hub.
    raise TLSError("the private key is encrypted; the hub needs an unencrypted key file (keep it mode 0600)")


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    for path in (cert_file, key_file):
        try:
            Path(path).open("rb").close()
        except OSError as exc:
            raise TLSError(f"cannot read the TLS file {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except TLSError as exc:
        raise TLSError(f"cannot load the TLS key {key_file}: {exc}") from None
    except OSError as exc:  # ssl.SSLError is an OSError too
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            reason = "the key does not belong to the certificate"
        elif isinstance(exc, ssl.SSLError):
            reason = f"not a PEM certificate chain and private key ({exc.reason or exc})"
        else:
            reason = exc.strerror or str(exc)
        raise TLSError(f"cannot load the TLS certificate {cert_file} with key {key_file}: {reason}") from None


def certificate_fingerprint(cert_file: str) -> str:
    """The SHA-256 fingerprint (hex) of the first certificate in a PEM file; "" if there is none."""
    text = Path(cert_file).read_text(errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return ""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)])).hexdigest()


def check_tls_files(config: TLSConfig) -> None:
    """Raise `TLSError` unless the configured certificate and key load (does nothing without TLS)."""
    if config.enabled:
        _load(_new_context(), config.cert_file, config.key_file)


class ServerTLS:
    """The listener's SSL context and the files it came from.

    `reload` loads the files again into the same context object, which trio's SSL
    listener reads at each accept: new handshakes get the new certificate, established
    connections keep theirs and carry on.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = _new_context()
        _load(self.context, cert_file, key_file)
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_config(cls, config: TLSConfig) -> ServerTLS | None:
        """The TLS of a configuration, or None when it has no certificate (plain ws://)."""
        return cls(config.cert_file, config.key_file) if config.enabled else None

    def _fingerprint(self) -> str:
        try:
            return certificate_fingerprint(self.cert_file)
        except (OSError, ValueError):
            return ""  # it loaded a moment ago; the fingerprint is for the log only

    def reload(self) -> bool:
        """Load the certificate and key files again for new connections; True if they changed the context.

        The files are first loaded into a scratch context: if they do not load (missing,
        unreadable, a key that does not match), the current certificate stays and the
        error is logged.
        """
        kv = {"cert_file": self.cert_file, "key_file": self.key_file}
        try:
            _load(_new_context(), self.cert_file, self.key_file)
        except TLSError as exc:
            log.error("tls reload failed: keeping the current certificate", extra={"kv": {**kv, "error": str(exc)}})
            return False
        try:
            _load(self.context, self.cert_file, self.key_file)
        except TLSError as exc:  # the files changed between the two loads
            log.error(
                "tls reload failed half-way: new handshakes may fail until the files are fixed and reloaded",
                extra={"kv": {**kv, "error": str(exc)}},
            )
            return False
        previous, self.fingerprint = self.fingerprint, self._fingerprint()
        log.info(
            "tls certificate reloaded",
            extra={"kv": {**kv, "sha256": self.fingerprint, "previous_sha256": previous}},
        )
        return True
