"""The contract between the operator and the workload image.

Ports, environment variable names and file locations that both sides use. The
operator imports this module (it imports nothing heavy), so every name here is
declared exactly once.
"""

# --- Ports (all fixed and declared on the pods and Services) -------------------------
RDZV_PORT = 29400          # c10d TCPStore served by the dedicated rendezvous pod
METRICS_PORT = 9400        # trainer's Prometheus metrics (prometheus-client)
SERVE_PORT = 8080          # inference server: Open Inference Protocol v2 REST + /metrics

# --- Environment set by the operator on training workers -----------------------------
ENV_JOB_NAME = "LEPTON_JOB_NAME"
ENV_JOB_NAMESPACE = "LEPTON_JOB_NAMESPACE"
ENV_JOB_UID = "LEPTON_JOB_UID"
ENV_CHECKPOINT_DIR = "LEPTON_CHECKPOINT_DIR"
ENV_OUTPUT_DIR = "LEPTON_OUTPUT_DIR"
ENV_METRICS_PORT = "LEPTON_METRICS_PORT"

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
RESULT_FILE = "result.json"                 # compression result, inside the artifact dir
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MODEL_FILE = "model.pt"                     # a model directory holds model.pt + meta.json
MODEL_META_FILE = "meta.json"
# Compression settings the operator passes to `python -m lepton_trainer.compress`
# (flags of the same meaning win over these).
ENV_COMPRESSION_METHOD = "LEPTON_COMPRESSION_METHOD"        # int8|fp16|bf16|prune|distill|none
ENV_COMPRESSION_PARAMS = "LEPTON_COMPRESSION_PARAMS"        # JSON object of method parameters
ENV_MAX_ACCURACY_DROP = "LEPTON_MAX_ACCURACY_DROP"          # float, absolute accuracy points (0..1)
# Batching settings of `python -m lepton_trainer.serve`
ENV_MAX_BATCH_SIZE = "LEPTON_MAX_BATCH_SIZE"
ENV_MAX_BATCH_DELAY_MS = "LEPTON_MAX_BATCH_DELAY_MS"

# --- Inference server metrics (served on SERVE_PORT at METRICS_PATH) -----------------
METRICS_MODEL_LABEL = "lepton_model"                          # served model name
METRICS_MODEL_NAMESPACE_LABEL = "lepton_namespace"            # value of ENV_MODEL_NAMESPACE
METRICS_REVISION_LABEL = "lepton_revision"                    # value of ENV_MODEL_REVISION
METRIC_SERVE_REQUESTS = "lepton_serve_requests_total"         # counter, label "code"
METRIC_SERVE_LATENCY = "lepton_serve_request_duration_seconds"  # histogram
METRIC_SERVE_INFLIGHT = "lepton_serve_inflight_requests"      # gauge
METRIC_SERVE_BATCH_SIZE = "lepton_serve_batch_size"           # histogram

# --- Inference server HTTP paths (Open Inference Protocol v2) -------------------------
HEALTH_LIVE_PATH = "/v2/health/live"
HEALTH_READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
