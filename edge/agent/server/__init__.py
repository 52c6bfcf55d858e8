"""The agent's local inference server over HTTP.

* :mod:`.app` builds the Starlette app; :mod:`.registry` holds the loaded models.
* :mod:`.kserve` serves the Open Inference Protocol (KServe v2); :mod:`.tensors` decodes and
  encodes its JSON and Triton binary tensors.
* :mod:`.openai_api` serves the OpenAI-compatible subset (models, embeddings, chat completions).
* :mod:`.batching` batches encoder requests; :mod:`.scheduler` shares an LLM fairly.
* :mod:`.metrics` exposes Prometheus metrics; :mod:`.errors` maps errors to HTTP responses;
  :mod:`.context` holds the limits and reads bodies within them.

Imports stay lazy (numpy and onnxruntime load with the first model), so an idle agent is small.
"""
