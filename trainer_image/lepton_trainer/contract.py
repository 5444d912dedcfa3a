"""The contract between the operator and the workload image.

Ports, environment variable names and file locations that both sides use. The
operator imports this module (it imports nothing heavy), so every name here is
declared exactly once.
"""

# --- Ports (all fixed and declared on the pods and Services) -------------------------
RDZV_PORT = 29400          # c10d TCPStore served by the dedicated rendezvous pod
RDZV_CONTROL_PORT = 29401  # the same pod: HTTP, where the operator reports lost workers
METRICS_PORT = 9400        # trainer's Prometheus metrics (prometheus-client)
SERVE_PORT = 8080          # inference server: Open Inference Protocol v2 REST + /metrics
GRPC_PORT = 8081           # inference server: v2 gRPC (inference.GRPCInferenceService)

# --- The rendezvous store's credential ---------------------------------------------------
# The operator keeps a random token in the job's Secret ``<job>-rdzv`` (key RDZV_TOKEN_KEY),
# mounted read-only into the store pod at RDZV_TOKEN_DIR. The store's control port then
# requires ``Authorization: Bearer <token>``; a store without the file (a pod of an older
# job) requires none.
RDZV_TOKEN_KEY = "token"
RDZV_TOKEN_DIR = "/var/run/secrets/lepton.ai/rendezvous"
RDZV_TOKEN_FILE = f"{RDZV_TOKEN_DIR}/{RDZV_TOKEN_KEY}"

# --- Environment set by the operator on training workers -----------------------------
ENV_JOB_NAME = "LEPTON_JOB_NAME"
ENV_JOB_NAMESPACE = "LEPTON_JOB_NAMESPACE"
ENV_JOB_UID = "LEPTON_JOB_UID"
ENV_CHECKPOINT_DIR = "LEPTON_CHECKPOINT_DIR"
ENV_OUTPUT_DIR = "LEPTON_OUTPUT_DIR"
ENV_METRICS_PORT = "LEPTON_METRICS_PORT"
# spec.faultTolerance perStep: each worker pod is one torchft replica group that joins the
# job's Lighthouse (the rendezvous pod runs it on RDZV_PORT instead of the c10d store).
ENV_FAULT_TOLERANCE = "LEPTON_FAULT_TOLERANCE"  # one of FAULT_TOLERANCE_MODES
ENV_REPLICA_ID = "LEPTON_REPLICA_ID"            # the replica group's name (the pod's)
ENV_MIN_REPLICAS = "LEPTON_MIN_REPLICAS"        # fewest replica groups that may commit a step
ENV_LIGHTHOUSE = "TORCHFT_LIGHTHOUSE"           # torchft's own: http://<rdzv Service>:RDZV_PORT
ENV_FT_TIMEOUT = "TORCHFT_TIMEOUT_SEC"          # torchft's own: collectives, commit, healing
ENV_FT_QUORUM_TIMEOUT = "TORCHFT_QUORUM_TIMEOUT_SEC"  # torchft's own: waiting for a quorum
ENV_FT_QUORUM_RETRIES = "TORCHFT_QUORUM_RETRIES"      # torchft's own: asking the Lighthouse again
ENV_FT_CONNECT_TIMEOUT = "TORCHFT_CONNECT_TIMEOUT_SEC"  # torchft's own: one (re)connection to the Lighthouse
FAULT_TOLERANCE_MODES = ("restart", "perStep")

# --- Trainer metrics (prometheus-client, served on METRICS_PORT by local rank 0) -------
# Label names avoid "job" and "namespace": Prometheus sets those on every scraped
# target and would rename ours to exported_job / exported_namespace.
METRICS_JOB_LABEL = "lepton_job"
METRICS_NAMESPACE_LABEL = "lepton_namespace"
METRIC_STEP = "lepton_train_step"                          # optimizer steps completed
METRIC_LOSS = "lepton_train_loss"                          # training loss of the last step
METRIC_SAMPLES_PER_SECOND = "lepton_train_samples_per_second"  # whole job, not per node
METRIC_WORLD_SIZE = "lepton_train_world_size"              # ranks in the current group
METRIC_CHECKPOINT_STEP = "lepton_train_last_checkpoint_step"
METRIC_RESTARTS = "lepton_train_restarts"                  # TORCHELASTIC_RESTART_COUNT

# --- Compression Job and inference server ---------------------------------------------
ENV_MODEL_DIR = "LEPTON_MODEL_DIR"          # input model directory (compression, serving)
ENV_MODEL_NAME = "LEPTON_MODEL_NAME"        # served model name (/v2/models/{name})
ENV_MODEL_NAMESPACE = "LEPTON_MODEL_NAMESPACE"  # LeptonModel namespace (metric label)
ENV_MODEL_REVISION = "LEPTON_MODEL_REVISION"    # serving revision (metric label)
ENV_ARTIFACT_DIR = "LEPTON_ARTIFACT_DIR"    # where compression writes its artifact
ENV_MODEL_FORMAT = "LEPTON_MODEL_FORMAT"    # one of MODEL_FORMATS; unset = detect from the directory
ENV_GRPC_PORT = "LEPTON_GRPC_PORT"          # gRPC port of the server (default GRPC_PORT; 0 = off)
RESULT_FILE = "result.json"                 # compression result, inside the artifact dir
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MODEL_FILE = "model.pt"                     # a model directory holds model.pt + meta.json
MODEL_META_FILE = "meta.json"
# Compression settings the operator passes to `python -m lepton_trainer.compress`
# (flags of the same meaning win over these).
ENV_COMPRESSION_METHOD = "LEPTON_COMPRESSION_METHOD"        # one of COMPRESSION_METHODS
ENV_COMPRESSION_PARAMS = "LEPTON_COMPRESSION_PARAMS"        # JSON object of method parameters
ENV_MAX_ACCURACY_DROP = "LEPTON_MAX_ACCURACY_DROP"          # float, absolute accuracy points (0..1)
ENV_COMPRESSION_EVALUATION = "LEPTON_COMPRESSION_EVALUATION"  # JSON object: the gate (gates.py)
COMPRESSION_METHODS = ("int8", "int8-static", "fp16", "bf16", "prune", "prune-structured", "distill",
                       "none", "auto")
# The methods implemented for exported programs (int8-static: exported programs only); every
# other pair of an exported format and a method is refused by the CRD and the parser.
EXPORTED_FORMAT_METHODS = {"torch.export": ("int8", "int8-static", "fp16", "bf16", "none", "auto"),
                           "onnx": ("int8", "int8-static", "fp16", "none", "auto"),
                           "torchscript": ("fp16", "bf16", "none", "auto")}
ENV_COMPRESSION_LATENCY_BUDGET = "LEPTON_COMPRESSION_LATENCY_BUDGET_SECONDS"  # seconds of timed passes per candidate
COMPRESSION_LATENCY_BUDGET_SECONDS = 10     # its default (the CRD's and the parser's)
MODEL_FORMATS = ("builtin", "torch.export", "torchscript", "huggingface", "onnx")  # ENV_MODEL_FORMAT values
# Keys of the ENV_COMPRESSION_EVALUATION object (gates.py) and of the auto parameters in
# ENV_COMPRESSION_PARAMS (compress.py); paths in them are absolute paths in the container.
EVALUATION_FIELDS = ("type", "path", "metric", "k", "maxDrop", "threshold", "samples", "output")
EVALUATION_TYPES = ("data", "fidelity")
EVALUATION_METRICS = {"data": ("accuracy", "top_k", "mse"), "fidelity": ("top1_agreement", "cosine")}
AUTO_PARAMS = ("candidates", "objective", "latencyTargetMs", "latencyBatch", "measureAll")
AUTO_OBJECTIVES = ("size", "latency")
# The compression result (RESULT_FILE and the termination message). RESULT_PASSED and
# RESULT_REASON are the verdict: the operator reports them and never re-derives them.
RESULT_PASSED = "passed"          # bool
RESULT_REASON = "reason"          # str (dropped from the termination message only if it alone overflows 4 KiB)
RESULT_METHOD = "method"          # the method applied; for auto, the one chosen
RESULT_GATE = "gate"              # {type, metric, output, before, after, rows, passed, ...}
RESULT_CANDIDATES = "candidates"  # auto only: one row per candidate (the table)
RESULT_ARTIFACT = "artifact"      # the artifact directory written (as the program saw it), once it holds the model
COMPRESS_EXIT_FAILED = 1          # exit status when compression could not be done (the reason is in the result)
COMPRESS_EXIT_GATE_FAILED = 3     # exit status when the gate fails (no artifact written)
# One progress line per step of a compression Job, in its log: PROGRESS_PREFIX and a JSON
# object {"candidate": k, "of": n, "method": m, "activity": text, "since": RFC 3339 UTC}
# (candidate 0: the original model; of 0: before the candidates are known). The operator
# reads the last one while the pod runs and shows it in status.compression.progress.
PROGRESS_PREFIX = "lepton-progress "
PROGRESS_FIELDS = ("candidate", "of", "method", "activity", "since")
# Batching settings of `python -m lepton_trainer.serve`
ENV_MAX_BATCH_SIZE = "LEPTON_MAX_BATCH_SIZE"
ENV_MAX_BATCH_DELAY_MS = "LEPTON_MAX_BATCH_DELAY_MS"
# Load shedding of `python -m lepton_trainer.serve` (admission.py)
ENV_MAX_CONCURRENT_REQUESTS = "LEPTON_MAX_CONCURRENT_REQUESTS"  # infer requests admitted at once
ENV_MAX_QUEUED_REQUESTS = "LEPTON_MAX_QUEUED_REQUESTS"          # requests waiting for a batch
ENV_QUEUE_TIMEOUT_MS = "LEPTON_QUEUE_TIMEOUT_MS"                # longest wait for a batch
ENV_MEMORY_LIMIT_BYTES = "LEPTON_MEMORY_LIMIT_BYTES"            # the container's memory limit

# --- Inference server metrics (served on SERVE_PORT at METRICS_PATH) -----------------
METRICS_MODEL_LABEL = "lepton_model"                          # served model name
METRICS_MODEL_NAMESPACE_LABEL = "lepton_namespace"            # value of ENV_MODEL_NAMESPACE
METRICS_REVISION_LABEL = "lepton_revision"                    # value of ENV_MODEL_REVISION
METRIC_SERVE_REQUESTS = "lepton_serve_requests_total"         # counter, label "code"
METRIC_SERVE_LATENCY = "lepton_serve_request_duration_seconds"  # histogram
METRIC_SERVE_INFLIGHT = "lepton_serve_inflight_requests"      # gauge
METRIC_SERVE_BATCH_SIZE = "lepton_serve_batch_size"           # histogram
METRIC_SERVE_REFUSED = "lepton_serve_refused_requests_total"  # counter, label "reason" (REFUSAL_REASONS)
METRIC_SERVE_QUEUE_DEPTH = "lepton_serve_queue_depth"         # gauge: requests waiting for a batch
METRIC_SERVE_ADMITTED_BYTES = "lepton_serve_admitted_bytes"   # gauge: memory reserved by admitted requests
METRIC_SERVE_MEMORY_BUDGET = "lepton_serve_memory_budget_bytes"  # gauge: what requests may reserve
METRIC_SERVE_ROW_BYTES = "lepton_serve_row_bytes"             # gauge: measured memory per row
METRIC_SERVE_MAX_REQUEST_ROWS = "lepton_serve_max_request_rows"  # gauge: rows one request may carry
# Why a request was refused (label "reason" of METRIC_SERVE_REFUSED)
REFUSAL_REASONS = ("concurrency", "queue_full", "memory", "too_large", "deadline")

# --- Language models (task text-generation) --------------------------------------------
# A LeptonModel of task TASK_TEXT_GENERATION is a causal language model: a Hugging Face
# directory (config.json, tokenizer, safetensors) or a GGUF file. `compress` and `serve`
# read ENV_TASK and hand over to lepton_trainer.llm; the server speaks the OpenAI API
# (/v1/chat/completions, /v1/completions, /v1/models, server-sent-event streaming) on
# SERVE_PORT, with the same health paths and /metrics as the OIP server.
ENV_TASK = "LEPTON_TASK"                    # one of TASKS; unset = TASK_PREDICT
TASK_PREDICT = "predict"                    # one forward pass per request (OIP v2)
TASK_TEXT_GENERATION = "text-generation"    # a causal language model (OpenAI API)
TASKS = (TASK_PREDICT, TASK_TEXT_GENERATION)
MODEL_FORMAT_GGUF = "gguf"                  # a .gguf file (or a directory holding one), language models only
LLM_MODEL_FORMATS = ("huggingface", MODEL_FORMAT_GGUF)
# Compression of language models: weight-only int8 / int4 (torchao), casts, or auto over them.
LLM_COMPRESSION_METHODS = ("int8-weight", "int4-weight", "bf16", "fp16", "none", "auto")
# The language-model gate (ENV_COMPRESSION_EVALUATION, type EVALUATION_PERPLEXITY): perplexity on
# a text sample ("path": a UTF-8 text file; unset = the sample the image ships) may rise by at most
# "maxPerplexityIncrease" (relative, 0.1 = +10 %), and greedy decoding of the sample prompts
# ("prompts": a file, one prompt per line; unset = the image's) must agree with the original's
# tokens on at least "minTokenAgreement" (0..1) of "maxNewTokens" tokens per prompt.
EVALUATION_PERPLEXITY = "perplexity"
LLM_EVALUATION_FIELDS = ("type", "path", "prompts", "maxPerplexityIncrease", "minTokenAgreement",
                         "maxNewTokens", "samples")
# Generation limits of the built-in language-model runtime (serving.generation)
ENV_MAX_PROMPT_TOKENS = "LEPTON_MAX_PROMPT_TOKENS"      # longest prompt accepted (tokens)
ENV_MAX_OUTPUT_TOKENS = "LEPTON_MAX_OUTPUT_TOKENS"      # largest max_tokens accepted
ENV_MAX_SEQUENCES = "LEPTON_MAX_SEQUENCES"              # sequences decoded at once (the batch)
# (ENV_MAX_QUEUED_REQUESTS and ENV_QUEUE_TIMEOUT_MS bound the waiting queue: past it, 429.)
# Language-model metrics: vLLM's names, so that dashboards and alerts written for vLLM read
# the built-in runtime unchanged (label "model_name" = the served model name).
LLM_METRIC_MODEL_LABEL = "model_name"
LLM_METRIC_TTFT = "vllm:time_to_first_token_seconds"       # histogram
LLM_METRIC_ITL = "vllm:inter_token_latency_seconds"        # histogram
LLM_METRIC_E2E = "vllm:e2e_request_latency_seconds"        # histogram
LLM_METRIC_PROMPT_TOKENS = "vllm:prompt_tokens_total"      # counter
LLM_METRIC_GENERATION_TOKENS = "vllm:generation_tokens_total"  # counter
LLM_METRIC_RUNNING = "vllm:num_requests_running"           # gauge
LLM_METRIC_WAITING = "vllm:num_requests_waiting"           # gauge
LLM_METRIC_KV_CACHE = "vllm:kv_cache_usage_perc"           # gauge, 0..1
LLM_METRIC_SUCCESS = "vllm:request_success_total"          # counter, label "finished_reason"
# (the runtime also counts METRIC_SERVE_REQUESTS by "code", which error-rate checks read)

# --- Inference server HTTP paths (Open Inference Protocol v2) -------------------------
HEALTH_LIVE_PATH = "/v2/health/live"
HEALTH_READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"

# --- The image's user and its writable paths -------------------------------------------
# trainer_image/Dockerfile creates this user (uid = gid); pods run as it unless the spec
# says otherwise. The root filesystem is read-only by default, so every pod gets an
# emptyDir at WRITABLE_DIR and HOME and TMPDIR point there (torchrun, torch's compile
# caches and tokenizers write under them).
IMAGE_UID = 10001
IMAGE_USER = "lepton"
WRITABLE_DIR = "/tmp"
