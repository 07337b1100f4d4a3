"""`lpreg eval`: accuracy (greedy, avg@k, unbiased pass@k), length and entropy of a checkpoint on
a JSON-lines or Parquet data file, sampled through a generator backend (hf or vllm)."""
