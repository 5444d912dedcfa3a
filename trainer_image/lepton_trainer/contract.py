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

# --- Compression Job and inference server ---------------------------------------------
ENV_MODEL_DIR = "LEPTON_MODEL_DIR"          # input model directory (compression, serving)
ENV_MODEL_NAME = "LEPTON_MODEL_NAME"        # served model name (/v2/models/{name})
ENV_ARTIFACT_DIR = "LEPTON_ARTIFACT_DIR"    # where compression writes its artifact
RESULT_FILE = "result.json"                 # compression result, inside the artifact dir
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MODEL_FILE = "model.pt"                     # a model directory holds model.pt + meta.json
MODEL_META_FILE = "meta.json"

# --- Inference server HTTP paths (Open Inference Protocol v2) -------------------------
HEALTH_LIVE_PATH = "/v2/health/live"
HEALTH_READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
