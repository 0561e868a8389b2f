"""User accounts of the built-in authorization server: practitioners, patients and
administrators who log in to authorize SMART apps (`authorization_code`).

Each account is linked to the FHIR resource it speaks for (`fhirUser`: `Practitioner/<id>` or
`Patient/<id>`). Passwords are hashed with argon2id. Failed logins are counted per email
address in MongoDB (`auth_logins`), whether or not an account has it, so that every server
process sees the same lockout and an unknown address answers exactly like a known one.
"""

import asyncio
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

ACCOUNTS = "auth_accounts"
LOGINS = "auth_logins"
Role = Literal["admin", "practitioner", "patient"]
ROLES: tuple[Role, ...] = ("admin", "practitioner", "patient")
FHIR_USER = re.compile(r"(Practitioner|Patient|PractitionerRole|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}")
EMAIL = re.compile(r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?")
SPECIAL = re.compile(r"[^A-Za-z0-9]")
MIN_PASSWORD = 8
MAX_PASSWORD = 256  # argon2 hashes anything, but a megabyte password is an attack on the CPU
LOGIN_FAILED = "The email address or password is not right, or the account is locked for a while."

_HASHER = PasswordHasher()
# Verified against when an address has no account, so that it costs the same time as a real one.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request about accounts that cannot be done; its message may be shown to the user."""


@dataclass(frozen=True)
class Account:
    account_id: str
    email: str
    role: Role
    fhir_user: str | None = None
    name: str = ""
    confirmed: bool = False  # the email address was proven (a link sent to it was followed)
    disabled: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        return (self.role,)

    @property
    def patient(self) -> str | None:
        """The Patient id a patient account's tokens are confined to."""
        if self.role == "patient" and self.fhir_user and self.fhir_user.startswith("Patient/"):
            return self.fhir_user.removeprefix("Patient/")
        return None

    def public(self) -> dict[str, Any]:
        """What the admin API shows (never the password hash)."""
        return {"id": self.account_id, "email": self.email, "role": self.role, "fhirUser": self.fhir_user,
                "name": self.name, "confirmed": self.confirmed, "disabled": self.disabled}


@dataclass(frozen=True)
class Lockout:
    max_failures: int = 5
    lockout_s: int = 900


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_email(email: str) -> str:
    email = normalize_email(email)
    if len(email) > 254 or not EMAIL.fullmatch(email):
        raise AccountError("Enter a valid email address.")
    return email


def check_password(password: str) -> None:
    """The password policy: 8 characters or more, with upper and lower case, a digit and
    another character."""
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"The password may have at most {MAX_PASSWORD} characters.")
    if (len(password) < MIN_PASSWORD or not any(c.isupper() for c in password)
            or not any(c.islower() for c in password) or not any(c.isdigit() for c in password)
            or not SPECIAL.search(password)):
        raise AccountError(f"The password needs at least {MIN_PASSWORD} characters, with an upper-case and a "
                           "lower-case letter, a digit and a special character.")


def check_fhir_user(role: str, fhir_user: str | None) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if fhir_user is not None and not FHIR_USER.fullmatch(fhir_user):
        raise AccountError("fhirUser must be a reference such as Practitioner/123 or Patient/456")
    if role == "patient" and fhir_user is not None and not fhir_user.startswith("Patient/"):
        raise AccountError("a patient account is linked to a Patient")
    if role == "practitioner" and not (fhir_user or "").startswith(("Practitioner/", "PractitionerRole/")):
        raise AccountError("a practitioner account is linked to its Practitioner (fhirUser Practitioner/<id>)")


async def hash_password(password: str) -> str:
    """argon2id: tens of milliseconds of CPU on purpose, in a thread (not the event loop's)."""
    return await asyncio.to_thread(_HASHER.hash, password)


def _account(document: dict[str, Any]) -> Account:
    return Account(document["_id"], document["email"], document["role"], document.get("fhir_user"),
                   document.get("name", ""), bool(document.get("confirmed")), bool(document.get("disabled")))


def password_stamp(document: dict[str, Any]) -> str:
    """Changes whenever the password does: a reset link names it, so it works once."""
    return hashlib.sha256(str(document.get("password", "")).encode()).hexdigest()[:16]


async def prepare(db: AsyncDatabase) -> None:
    await db[ACCOUNTS].create_index("email", unique=True)
    await db[LOGINS].create_index("expires", expireAfterSeconds=0)


async def create(db: AsyncDatabase, email: str, role: str, fhir_user: str | None = None, password: str | None = None,
                 *, name: str = "", confirmed: bool = False) -> Account:
    """A new account; AccountError for a taken address, a bad role, link or password. Without a
    password nobody can log in until one is set through a reset link."""
    email = check_email(email)
    check_fhir_user(role, fhir_user)
    if password is not None:
        check_password(password)
    document = {"_id": secrets.token_hex(12), "email": email, "role": role, "fhir_user": fhir_user,
                "name": name.strip()[:200], "password": await hash_password(password) if password is not None else None,
                "confirmed": confirmed, "disabled": False, "created": time.time()}
    try:
        await db[ACCOUNTS].insert_one(document)
    except DuplicateKeyError as exc:
        raise AccountError(f"an account with the address {email} exists already") from exc
    return _account(document)


async def find(db: AsyncDatabase, account_id: str) -> Account | None:
    found = await db[ACCOUNTS].find_one({"_id": account_id})
    return _account(found) if found else None


async def find_by_email(db: AsyncDatabase, email: str) -> tuple[Account, dict[str, Any]] | None:
    found = await db[ACCOUNTS].find_one({"email": normalize_email(email)})
    return (_account(found), found) if found else None


async def all_accounts(db: AsyncDatabase, limit: int = 1000) -> list[Account]:
    return [_account(d) async for d in db[ACCOUNTS].find({}, sort=[("email", 1)], limit=limit)]


async def set_disabled(db: AsyncDatabase, account_id: str, disabled: bool = True) -> Account | None:
    found = await db[ACCOUNTS].find_one_and_update({"_id": account_id}, {"$set": {"disabled": disabled}},
                                                   return_document=ReturnDocument.AFTER)
    return _account(found) if found else None


async def confirm(db: AsyncDatabase, account_id: str) -> Account | None:
    found = await db[ACCOUNTS].find_one_and_update({"_id": account_id}, {"$set": {"confirmed": True}},
                                                   return_document=ReturnDocument.AFTER)
    return _account(found) if found else None


async def link(db: AsyncDatabase, account_id: str, fhir_user: str) -> bool:
    """Link an account that has no FHIR resource yet (a self-registered patient)."""
    done = await db[ACCOUNTS].update_one({"_id": account_id, "fhir_user": None}, {"$set": {"fhir_user": fhir_user}})
    return done.modified_count == 1


async def set_password(db: AsyncDatabase, account_id: str, password: str, stamp: str | None = None) -> bool:
    """A new password (the account's address is proven by the link that led here: confirmed);
    with `stamp`, only while the password is still the one the link was made for."""
    check_password(password)
    found = await db[ACCOUNTS].find_one({"_id": account_id})
    if found is None or (stamp is not None and password_stamp(found) != stamp):
        return False
    done = await db[ACCOUNTS].update_one({"_id": account_id, "password": found.get("password")},
                                         {"$set": {"password": await hash_password(password), "confirmed": True}})
    if done.modified_count:
        await db[LOGINS].delete_one({"_id": found["email"]})
    return done.modified_count == 1


class LoginFailed(Exception):
    """A login that failed; its message never tells whether the address has an account."""

    def __init__(self, message: str = LOGIN_FAILED) -> None:
        super().__init__(message)
        self.message = message


async def login(db: AsyncDatabase, email: str, password: str, lockout: Lockout) -> Account:
    """The account whose address and password these are; LoginFailed otherwise, with the one
    generic message for an unknown address, a wrong password, a locked address or a disabled
    account. An unconfirmed account with the right password is told to confirm first."""
    email = normalize_email(email)[:254]
    password = password[:MAX_PASSWORD + 1]
    now = datetime.now(UTC)
    state = await db[LOGINS].find_one({"_id": email})
    locked = bool(state and state.get("locked_until") and _aware(state["locked_until"]) > now)
    found = None if locked else await db[ACCOUNTS].find_one({"email": email})
    stored = (found or {}).get("password") or _DUMMY_HASH
    try:
        await asyncio.to_thread(_HASHER.verify, stored, password)
        right = found is not None and found.get("password") is not None and not locked
    except (VerificationError, InvalidHashError):
        right = False
    if not right:
        if not locked:
            await _failed(db, email, now, lockout)
        raise LoginFailed()
    assert found is not None
    account = _account(found)
    await db[LOGINS].delete_one({"_id": email})
    if account.disabled:
        raise LoginFailed()
    if not account.confirmed:
        raise LoginFailed("Confirm your email address first: follow the link in the mail we sent you.")
    if _HASHER.check_needs_rehash(stored):
        await db[ACCOUNTS].update_one({"_id": account.account_id, "password": stored},
                                      {"$set": {"password": await hash_password(password)}})
    return account


async def _failed(db: AsyncDatabase, email: str, now: datetime, lockout: Lockout) -> None:
    """Count a failure; the `max_failures`-th in a row (each within `lockout_s` of the last)
    locks the address for `lockout_s`."""
    expires = now + timedelta(seconds=lockout.lockout_s)
    while True:
        state = await db[LOGINS].find_one_and_update(
            {"_id": email, "expires": {"$gt": now}}, {"$inc": {"failures": 1}, "$set": {"expires": expires}},
            return_document=ReturnDocument.AFTER)
        if state is not None:
            break
        try:  # the first: none yet, or an expired one the TTL monitor has not removed yet
            await db[LOGINS].replace_one({"_id": email, "expires": {"$lte": now}},
                                         {"failures": 1, "expires": expires}, upsert=True)
            return
        except DuplicateKeyError:
            continue  # a concurrent first failure counted before this one: count it on top
    if state.get("failures", 0) >= lockout.max_failures:
        await db[LOGINS].update_one({"_id": email}, {"$set": {"failures": 0, "locked_until": expires}})


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
