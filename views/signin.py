"""Who is using the app, settled before any page runs (app.py calls `signed_in_user`).

- `[auth]` in .streamlit/secrets.toml: the identity provider's sign-in (st.login); the account
  is the e-mail, which an admin adds with a role (`python -m db.users add EMAIL --sso ...`).
- Local accounts (`python -m db.users add NAME ...`): a name and password form; the sign-in
  lasts across reloads and tabs in a cookie (views/sign_in_cookie.py, db/sign_ins.py).
- Neither, and only this machine can reach the app: the single local admin, as without
  accounts. Reachable from elsewhere: no data, and how to add an account.
"""

import shlex

import streamlit as st

from db import sign_ins
from db.users import LOCAL, SignInRefused, User, find_provider_user, has_accounts, has_passwords, sign_in
from engine.runtime.markdown import literal
from views.sign_in_cookie import COOKIE, END_URL, HANDOVERS, begin_url, can_keep

LOOPBACK = ("localhost", "127.0.0.1", "::1")
# Headers a reverse proxy adds: the browser is then on another machine, whatever Host says.
PROXY_HEADERS = ("X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "X-Real-Ip")
ADD_ACCOUNT = (
    "python -m db.users add NAME --role admin",
    "python -m db.users add EMAIL --role reviewer --sso",
)


def _hostname(host: str) -> str:
    """`localhost:8501` -> localhost; `[::1]:8501` -> ::1."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def served_locally(address: str | None, headers) -> bool:
    """Whether only this machine reaches the app: the server listens on a loopback address (an
    unset `server.address` listens on every interface), and the request came straight from a
    browser that asked for a loopback host, not through a proxy."""
    if (address or "").strip("[]") not in LOOPBACK:
        return False
    if any(headers.get(name) for name in PROXY_HEADERS):
        return False
    host = headers.get("Host")
    return host is None or _hostname(host) in LOOPBACK


def auth_configured() -> bool:
    """Whether `[auth]` in .streamlit/secrets.toml sets up an identity provider."""
    return st.secrets.load_if_toml_exists() and "auth" in st.secrets


# Sends the browser to a cookie route of this server, which sends it back to this page.
_GO = st.components.v2.component(
    "go_to",
    js="""
export default function ({ data }) {
  const next = encodeURIComponent(location.pathname + location.search);
  location.replace(`${data.url}${data.url.includes("?") ? "&" : "?"}next=${next}`);
}""",
)


def _sign_in(db_url: str) -> None:
    password, st.session_state.signin_password = st.session_state.signin_password, ""
    try:
        user = sign_in(db_url, st.session_state.signin_name, password)
    except SignInRefused as exc:
        st.session_state.signin_refusal = f"{exc}."
        return
    token = sign_ins.begin(db_url, user.name)
    st.session_state.sign_in_token = token  # this tab's, until the cookie takes over
    if can_keep(st.context.url):
        max_age = int(sign_ins.limits(db_url).absolute.total_seconds())
        st.session_state.go_to = begin_url(HANDOVERS.put(token, max_age))


def _sign_out(db_url: str, token: str) -> None:
    sign_ins.end(db_url, token)  # every tab of this sign-in, at its next rerun
    st.session_state.pop("sign_in_token", None)  # after a reload, only the cookie holds it
    if _cookie():
        st.session_state.go_to = END_URL


def _cookie() -> str | None:
    return st.context.cookies.to_dict().get(COOKIE)


def _token() -> str | None:
    return st.session_state.get("sign_in_token") or _cookie()


def sign_out_ui(db_url: str) -> None:
    """The sidebar's sign-out: a local account's, or the identity provider's."""
    if token := _token():
        st.button("Sign out", key="signout", on_click=_sign_out, args=(db_url, token))
    elif st.user.get("is_logged_in") and st.button("Sign out", key="signout"):
        st.logout()


def _form_ui(db_url: str) -> None:
    with st.form("signin"):
        st.text_input("Name", key="signin_name", autocomplete="username")
        st.text_input("Password", type="password", key="signin_password", autocomplete="current-password")
        st.form_submit_button(
            "Sign in", key="signin_submit", type="primary", on_click=_sign_in, args=(db_url,)
        )
    if st.context.url and not can_keep(st.context.url):
        st.caption(
            "This page comes over plain HTTP from another machine, so a sign-in lasts "
            "only until the page is reloaded: served over HTTPS, it lasts across reloads "
            "and tabs (see the README's accounts section)."
        )
    if "signin_refusal" in st.session_state:
        st.error(literal(st.session_state.pop("signin_refusal")))


def _provider_user(db_url: str) -> User | None:
    """The identity provider's user, if the provider verified their e-mail and an admin has
    added it as an account of the provider."""
    email = st.user.get("email")
    if not isinstance(email, str):  # None without the claim (st.user types claims as str, bool or tokens)
        email = ""
    user = find_provider_user(db_url, email, verified=st.user.get("email_verified") is True)
    if user is None:
        st.title("Not added yet")
        st.warning(
            f"You are signed in as {literal(email or 'a user without an e-mail')}, but "
            "no enabled account of the identity provider has that e-mail, or the "
            "provider has not verified it. Ask an admin to add you:"
        )
        st.code(
            f"python -m db.users add {shlex.quote(email) if email else 'EMAIL'} --role reviewer --sso",
            language="bash",
        )
        if st.button("Sign out", key="signout_provider"):
            st.logout()
    return user


def _refusal_ui() -> None:
    st.title("Sign-in needed")
    st.error(
        "This server is reachable from other machines, and it has neither accounts nor "
        "an identity provider: it shows no data until one of them is set up."
    )
    st.markdown("Add an account on the server, in the app's folder, then reload this page:")
    st.code("\n".join(ADD_ACCOUNT), language="bash")
    st.markdown(
        "Or set up institutional sign-in in `.streamlit/secrets.toml` (`[auth]`, "
        "see the README), or serve the app on this machine only "
        "(`--server.address localhost`)."
    )


def signed_in_user(db_url: str) -> User | None:
    """The user of this browser session; None, with the sign-in drawn, until there is one."""
    provider = auth_configured()
    if provider and st.user.get("is_logged_in"):
        return _provider_user(db_url)
    if url := st.session_state.pop("go_to", None):
        _GO(data={"url": url}, key="go_to")
    token = _token()
    user = sign_ins.visit(db_url, token) if token else None
    if user is not None:
        return user
    st.session_state.pop("sign_in_token", None)  # ended, expired or disabled meanwhile
    if not provider and not has_accounts(db_url):
        if served_locally(st.get_option("server.address"), st.context.headers):
            return LOCAL
        _refusal_ui()
        return None
    st.title("Sign in")
    if provider and st.button("Sign in with your institution", key="signin_provider", type="primary"):
        st.login()
    if has_passwords(db_url):
        _form_ui(db_url)
    return None
