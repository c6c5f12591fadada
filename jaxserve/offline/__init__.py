"""Offline jobs over JSONL files, resumable: `generate` (text generation, `jaxserve generate
--input`) and `score` (candidate log-probabilities, `jaxserve score`); `jsonl` holds what both do
with their files (read and validate the whole input, skip ids already written, append each
record as it finishes). Each job only validates and hands the work to `LLM`.
"""
