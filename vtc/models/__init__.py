"""Models vtc ships or builds: tiny random HF LLaVA models (random.py) and the embedded default."""
