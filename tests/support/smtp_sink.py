"""An SMTP server for the alert tests: records every mail it accepts.

    python smtp_sink.py DIR [USER PASSWORD [CERT KEY]]

Listens on a free port of 127.0.0.1, prints the port on the first line of stdout,
writes each accepted message to DIR/mail-N.eml (envelope sender and recipients in
X-Envelope-* headers) and runs until killed. With USER and PASSWORD it advertises
AUTH (PLAIN, LOGIN) and refuses mail from clients that did not log in with them.
With CERT and KEY (PEM) it offers STARTTLS and requires it before AUTH and mail.
"""

import pathlib
import socket
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Recorder:
    def __init__(self, out: pathlib.Path):
        self.out = out
        self.lock = threading.Lock()
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        if server._authenticator is not None and not session.authenticated:
            return "530 5.7.0 authentication required"
        with self.lock:
            self.count += 1
            n = self.count
        head = f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {','.join(envelope.rcpt_tos)}\r\n"
        tmp = self.out / f".mail-{n}.tmp"
        tmp.write_bytes(head.encode() + envelope.original_content)
        tmp.rename(self.out / f"mail-{n}.eml")
        return "250 OK"


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if len(sys.argv) >= 4:
        user, password = sys.argv[2].encode(), sys.argv[3].encode()

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and auth_data.login == user and auth_data.password == password
            return AuthResult(success=ok)

        # Without a certificate, a local test server: allow AUTH over plain text.
        kwargs = {"authenticator": authenticator, "auth_require_tls": len(sys.argv) == 6}
    if len(sys.argv) == 6:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[4], sys.argv[5])
        kwargs.update(tls_context=context, require_starttls=True)
    # The controller checks its server by connecting to the port it was given, so
    # it needs a real one: take a free port from the kernel first.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    controller = Controller(Recorder(out), hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    print(port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
