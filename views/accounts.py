"""Accounts page, for admins only (app.py lists it for no one else): who may sign in and with
which role, as `python -m db.users` manages them on the server."""

import pandas as pd
import streamlit as st

from db import sign_ins
from db.schema import utcnow
from db.users import (
    MAX_FAILURES,
    MIN_PASSWORD,
    ROLES,
    AccountError,
    NotAllowed,
    accounts,
    add_account,
    set_disabled,
    set_password,
)
from engine.runtime.markdown import literal
from views.common import current_user, get_workspace

workspace = get_workspace()


def accounts_ui() -> None:
    rows = accounts(workspace.db_url)
    if not rows:
        st.info(
            "No accounts yet: the app runs as one local admin, on this machine only. The "
            "first account turns sign-in on, so make it an admin whose password you know."
        )
        return
    now = utcnow()
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "account": row.name,
                    "role": row.role,
                    "signs in with": "password" if row.password_hash else "identity provider",
                    "disabled": row.disabled,
                    "locked until (UTC)": row.locked_until
                    if row.failures >= MAX_FAILURES and row.locked_until and row.locked_until > now
                    else None,
                }
                for row in rows
            ]
        ),
        hide_index=True,
    )


def add_ui(first: bool) -> None:
    with st.form("add_account", clear_on_submit=True):
        st.markdown("**Add an account**")
        name = st.text_input("Name, or the e-mail the identity provider gives", key="new_name")
        role = st.radio(
            "Role",
            ROLES,
            index=ROLES.index("admin" if first else "reviewer"),
            horizontal=True,
            key="new_role",
        )
        sso = st.checkbox("Signs in through the identity provider (no password)", key="new_sso")
        password = st.text_input(
            f"Password (at least {MIN_PASSWORD} characters)", type="password", key="new_password"
        )
        if not st.form_submit_button("Add", key="add_account_submit"):
            return
    try:
        user = add_account(workspace.db_url, name, role, None if sso else password, user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"{literal(name.strip()) or 'The account'} was not added: {literal(exc)}.")
        return
    st.success(f"Added {literal(user.name)} ({user.role}).")


def disabled_ui(name: str, disabled: bool) -> None:
    state = "disabled" if disabled else "enabled"
    try:
        set_disabled(workspace.db_url, name, disabled, user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"{literal(name)} was not {state}: {literal(exc)}.")
        return
    st.success(f"{literal(name)} is {state}.")


def change_ui(names: list[str]) -> None:
    st.markdown("**Change an account**")
    name = st.selectbox("Account", names, key="change_account")
    disable, enable = st.columns(2)
    if name == current_user().name:
        disable.caption("You cannot disable the account you are signed in with.")
    elif disable.button("Disable", key="disable_account"):
        disabled_ui(name, True)
    if enable.button("Enable", key="enable_account"):
        disabled_ui(name, False)
    with st.form("set_password", clear_on_submit=True):
        password = st.text_input(
            f"New password for {literal(name)} (lifts a lock, ends its sign-ins)",
            type="password",
            key="set_password",
        )
        if not st.form_submit_button("Set the password", key="set_password_submit"):
            return
    try:
        set_password(workspace.db_url, name, password, user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"No new password for {literal(name)}: {literal(exc)}.")
        return
    st.success(f"New password set for {literal(name)}.")


def _label(sign_in) -> str:
    return (
        f"{sign_in.account} · since {sign_in.created_at:%Y-%m-%d %H:%M} · last seen "
        f"{sign_in.last_seen_at:%Y-%m-%d %H:%M} UTC"
    )


# The sign-in controls act in callbacks, before the page is drawn again: the list then no
# longer offers what ended, and the caption says the limits just set.
def _end_chosen() -> None:
    try:
        ended = sign_ins.end_by_admin(workspace.db_url, st.session_state.end_sign_ins, user=current_user())
    except NotAllowed as exc:
        st.session_state.sign_ins_outcome = st.error, literal(exc)
        return
    st.session_state.end_sign_ins = []
    st.session_state.sign_ins_outcome = (
        st.success,
        (f"{ended} sign-in{'s' if ended != 1 else ''} ended: each is signed out at its next click."),
    )


def _set_limits() -> None:
    try:
        sign_ins.set_limits(
            workspace.db_url, st.session_state.idle_hours, st.session_state.absolute_days, user=current_user()
        )
    except (NotAllowed, ValueError) as exc:
        st.session_state.sign_ins_outcome = st.error, (f"The limits were not changed: {literal(exc)}.")
        return
    st.session_state.sign_ins_outcome = st.success, ("New limits set; they hold for sign-ins open now too.")


def sign_ins_ui() -> None:
    """Who is signed in with a password, and ending their sign-ins; how long one lasts."""
    st.markdown("**Sign-ins**")
    db_url = workspace.db_url
    limits = sign_ins.limits(db_url)
    st.caption(
        f"A sign-in lasts until Sign out, {limits.idle_hours:g} h without a visit, or "
        f"{limits.absolute_days:g} days at most; disabling an account or setting its "
        "password ends its sign-ins."
    )
    labels = {row.token_hash: _label(row) for row in sign_ins.open_sign_ins(db_url)}
    chosen = st.multiselect(
        "Open sign-ins",
        list(labels),
        format_func=labels.__getitem__,
        placeholder="choose to end" if labels else "none open",
        key="end_sign_ins",
    )
    st.button("End the chosen sign-ins", key="end_sign_ins_submit", disabled=not chosen, on_click=_end_chosen)
    with st.form("sign_in_limits"):
        idle, absolute = st.columns(2)
        idle.number_input("Hours without a visit", 0.25, 24.0 * 30, limits.idle_hours, key="idle_hours")
        absolute.number_input("Days at most", 0.1, 365.0, limits.absolute_days, key="absolute_days")
        st.form_submit_button("Set the limits", key="set_limits", on_click=_set_limits)
    if outcome := st.session_state.pop("sign_ins_outcome", None):
        show, text = outcome
        show(text)


st.title("Accounts")
st.caption(
    "Reviewers review and see progress; admins also import, train, run inference, "
    "promote, export and manage accounts."
)
table = st.container()  # filled last, so that it shows what the forms below just changed
names = [account.name for account in accounts(workspace.db_url)]
add_ui(first=not names)
if names:
    change_ui(names)
    sign_ins_ui()
with table:
    accounts_ui()
