"""vLLM integration tests of the flashmla_backend plugin (see conftest.py)."""
