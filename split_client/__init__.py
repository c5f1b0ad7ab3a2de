"""Split execution: the SplitLLM placement planner and the client library.

Importable without vLLM or torch; the planner (`adaptivellm.split_client.planner`) needs only
numpy. Submodules are imported explicitly so that importing this package stays cheap.
"""
