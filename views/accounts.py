"""Accounts page, for admins only (app.py lists it for no one else): who may sign in and with
which role, as `python -m db.users` manages them on the server."""

import pandas as pd
import streamlit as st

from db.schema import utcnow
from db.users import (MAX_FAILURES, MIN_PASSWORD, ROLES, AccountError, NotAllowed, accounts,
                      add_account, set_disabled, set_password)
from views.common import current_user, get_workspace

workspace = get_workspace()


def accounts_ui() -> None:
    rows = accounts(workspace.db_url)
    if not rows:
        st.info("No accounts yet: the app runs as one local admin, on this machine only. The "
                "first account turns sign-in on, so make it an admin whose password you know.")
        return
    now = utcnow()
    st.dataframe(pd.DataFrame([{
        "account": row.name, "role": row.role,
        "signs in with": "password" if row.password_hash else "identity provider",
        "disabled": row.disabled,
        "locked until (UTC)": row.locked_until if row.failures >= MAX_FAILURES
        and row.locked_until and row.locked_until > now else None} for row in rows]),
        hide_index=True)


def add_ui(first: bool) -> None:
    with st.form("add_account", clear_on_submit=True):
        st.markdown("**Add an account**")
        name = st.text_input("Name, or the e-mail the identity provider gives", key="new_name")
        role = st.radio("Role", ROLES, index=ROLES.index("admin" if first else "reviewer"),
                        horizontal=True, key="new_role")
        sso = st.checkbox("Signs in through the identity provider (no password)", key="new_sso")
        password = st.text_input(f"Password (at least {MIN_PASSWORD} characters)",
                                 type="password", key="new_password")
        if not st.form_submit_button("Add", key="add_account_submit"):
            return
    try:
        user = add_account(workspace.db_url, name, role, None if sso else password,
                           user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"{name.strip() or 'The account'} was not added: {exc}.")
        return
    st.success(f"Added {user.name} ({user.role}).")


def disabled_ui(name: str, disabled: bool) -> None:
    state = "disabled" if disabled else "enabled"
    try:
        set_disabled(workspace.db_url, name, disabled, user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"{name} was not {state}: {exc}.")
        return
    st.success(f"{name} is {state}.")


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
        password = st.text_input(f"New password for {name} (lifts a lock)", type="password",
                                 key="set_password")
        if not st.form_submit_button("Set the password", key="set_password_submit"):
            return
    try:
        set_password(workspace.db_url, name, password, user=current_user())
    except (AccountError, NotAllowed) as exc:
        st.error(f"No new password for {name}: {exc}.")
        return
    st.success(f"New password set for {name}.")


st.title("Accounts")
st.caption("Reviewers review and see progress; admins also import, train, run inference, "
           "promote, export and manage accounts.")
table = st.container()  # filled last, so that it shows what the forms below just changed
names = [account.name for account in accounts(workspace.db_url)]
add_ui(first=not names)
if names:
    change_ui(names)
with table:
    accounts_ui()
