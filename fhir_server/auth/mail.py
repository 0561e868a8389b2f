"""Mail of the built-in authorization server (registration, password reset) through an SMTP
server (`FHIR_SMTP_*`), with the standard library's smtplib in a worker thread.

Mail goes out in the background: a page answers at once and in the same time whether or not a
mail was sent (which would otherwise tell who has an account). At most MAX_PER_HOUR mails go to
one address an hour (`auth_mail_log`, shared by every server process), so that the forms
cannot be used to flood someone's mailbox.
"""

import asyncio
import logging
import smtplib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.config import Settings

LOGGER = logging.getLogger(__name__)
MAIL_LOG = "auth_mail_log"
MAX_PER_HOUR = 5


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int = 25
    sender: str = "fhir-server@localhost"
    user: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout_s: float = 10.0

    def send(self, message: EmailMessage) -> None:
        """Blocking: run it in a thread."""
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            if self.starttls:
                smtp.starttls()
            if self.user:
                smtp.login(self.user, self.password or "")
            smtp.send_message(message)


class Mailer:
    """Sends the server's mails; `enabled` is false without an SMTP server or a public URL."""

    def __init__(self, db: AsyncDatabase, smtp: SmtpServer | None, public_issuer: str | None) -> None:
        self.db = db
        self.smtp = smtp
        self.public_issuer = public_issuer  # where mailed links point
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, db: AsyncDatabase, settings: Settings) -> "Mailer":
        smtp = None
        if settings.smtp_host:
            smtp = SmtpServer(settings.smtp_host, settings.smtp_port, settings.smtp_from, settings.smtp_user,
                              settings.smtp_password, settings.smtp_starttls, settings.smtp_timeout_s)
        return cls(db, smtp, public_issuer(settings))

    @property
    def enabled(self) -> bool:
        return self.smtp is not None and self.public_issuer is not None

    async def prepare(self) -> None:
        await self.db[MAIL_LOG].create_index("expires", expireAfterSeconds=0)

    def send_later(self, to: str, subject: str, text: str) -> None:
        """Send in the background (errors are logged, not raised)."""
        task = asyncio.create_task(self._send(to, subject, text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, to: str, subject: str, text: str) -> None:
        if self.smtp is None:
            return
        if not await self._allowed(to):
            LOGGER.warning("Mail not sent: too many mails to one address this hour", extra={"subject": subject})
            return
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.smtp.sender, to, subject
        message.set_content(text)
        try:
            await asyncio.to_thread(self.smtp.send, message)
        except (OSError, smtplib.SMTPException) as exc:
            LOGGER.error("Mail not sent: %s", exc, extra={"subject": subject})

    async def _allowed(self, to: str) -> bool:
        now = datetime.now(UTC)
        found = await self.db[MAIL_LOG].find_one_and_update(
            {"_id": to.lower(), "expires": {"$gt": now}}, {"$inc": {"sent": 1}}, return_document=ReturnDocument.AFTER)
        if found is None:
            await self.db[MAIL_LOG].replace_one({"_id": to.lower()}, {"sent": 1, "expires": now + timedelta(hours=1)},
                                                upsert=True)
            return True
        return int(found.get("sent", 0)) <= MAX_PER_HOUR


def public_issuer(settings: Settings) -> str | None:
    """The issuer as configured (FHIR_AUTH_ISSUER, else FHIR_BASE_URL less /fhir, + /auth);
    None when only a request's Host header could tell, which anyone can forge."""
    if settings.auth_issuer:
        return settings.auth_issuer.rstrip("/")
    if settings.base_url:
        return settings.base_url.rstrip("/").removesuffix("/fhir") + "/auth"
    return None
