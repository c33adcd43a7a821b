"""vLLM attention-backend plugin (placeholder until the adapter lands)."""


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    raise NotImplementedError("the vLLM adapter is not written yet")
