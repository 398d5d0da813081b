import streamlit as st

st.title("Retrain")
