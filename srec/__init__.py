"""srec: multimodal-LLM sequential recommendation. Plain logic, no Dagster imports."""
