import streamlit as st

st.title("Inference")
