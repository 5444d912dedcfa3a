"""Names declared once: API group, kinds, labels, annotations, conditions, reasons, phases.

Ports and environment variable names shared with the workload image live in
``lepton_trainer.contract``; this module holds the operator-side names.
"""

# --- API group, versions, kinds -------------------------------------------------------
GROUP = "lepton.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

JOB_KIND = "LeptonJob"
JOB_PLURAL = "leptonjobs"

MODEL_KIND = "LeptonModel"
MODEL_PLURAL = "leptonmodels"

FIELD_MANAGER = "lepton-operator"       # the one server-side-apply field manager
USER_AGENT = "lepton-operator"          # HTTP User-Agent of the operator's own API calls

# --- Labels ---------------------------------------------------------------------------
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_JOB = f"{GROUP}/job"                      # job name on every child of a LeptonJob
LABEL_ROLE = f"{GROUP}/role"                    # ROLE_* below
LABEL_WORKER_INDEX = f"{GROUP}/worker-index"    # 0-based worker index
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue LocalQueue pass-through

LABEL_MODEL = f"{GROUP}/model"                  # model name on every child of a LeptonModel
LABEL_REVISION = f"{GROUP}/revision"            # serving revision (hash of source+compression+serving)
ROLE_WORKER = "worker"
ROLE_SERVING = "serving"
ROLE_COMPRESSION = "compression"
ROLE_RDZV = "rendezvous"
ROLE_CAPACITY = "capacity"                      # a job's ProvisioningRequest and its PodTemplate
MANAGED_BY = "lepton-operator"

# --- Annotations ----------------------------------------------------------------------
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"         # hash of what a child was built from (a worker's
                                                    # template, a NetworkPolicy's spec)
ANNOTATION_GENERATION = f"{GROUP}/generation"      # the owner's metadata.generation it was built at
# Set by a person on a LeptonModel whose rollout is paused: the canary revision to resume
# (its step counts as passed) or to abort (rolled back).
ANNOTATION_RESUME = f"{GROUP}/resume"
ANNOTATION_ABORT = f"{GROUP}/abort"

# --- Finalizers -------------------------------------------------------------------------
# The operator puts no finalizer on its objects (every child is garbage-collected through its
# owner reference). Releases that reconciled through kopf daemons left kopf's finalizer, under
# the name they configured or kopf's default; the operator removes these from an object once.
LEGACY_FINALIZERS = (f"{GROUP}/finalizer", "kopf.zalando.org/KopfFinalizerMarker")

# --- Kubernetes names -----------------------------------------------------------------
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"   # NVIDIA's GPU feature discovery labels GPU nodes so
DNS1035_MAX = 63                 # Service names and labels
CHILD_SUFFIX_MAX = len("-worker-999")   # longest suffix the operator appends to a job name
JOB_NAME_MAX = DNS1035_MAX - CHILD_SUFFIX_MAX

# --- Conditions (kstatus-compatible) ----------------------------------------------------
COND_READY = "Ready"
COND_RECONCILING = "Reconciling"
COND_STALLED = "Stalled"

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# Reasons (CamelCase, stable API: clients may match on them)
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CREATING = "CreatingWorkers"
REASON_WAITING_FOR_CAPACITY = "WaitingForCapacity"
REASON_CAPACITY_TIMEOUT = "CapacityTimeout"
REASON_RUNNING = "Running"
REASON_SCALING = "Scaling"
REASON_RESTARTING = "Restarting"
REASON_SUSPENDED = "Suspended"
REASON_SUCCEEDED = "Succeeded"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_WORKER_FAILED = "WorkerFailed"
REASON_WORKER_DISRUPTED = "WorkerDisrupted"
REASON_TRAINING_STALLED = "TrainingStalled"       # Running, but no training step within its window
REASON_STORE_UNREACHABLE = "StoreUnreachable"     # workers cannot reach a store whose pod is Ready
REASON_RESUMED = "Resumed"
REASON_TEMPLATE_CHANGED = "TemplateChanged"
REASON_TTL_EXPIRED = "TTLExpired"

# LeptonModel condition types (besides Ready/Reconciling/Stalled) and reasons
COND_COMPRESSED = "Compressed"
COND_METRICS = "MetricsAvailable"        # the autoscaler's Prometheus answers
COND_SOURCE_AVAILABLE = "SourceAvailable"  # the source (job output, PVC) can be read now
REASON_WAITING_FOR_SOURCE = "WaitingForSource"
REASON_SOURCE_NOT_FOUND = "SourceNotFound"
REASON_SOURCE_FAILED = "SourceFailed"
REASON_COMPRESSING = "Compressing"
REASON_COMPRESSION_POD_PENDING = "CompressionPodPending"   # the scheduler cannot place its pod
REASON_COMPRESSED = "Compressed"
REASON_GATE_FAILED = "AccuracyGateFailed"
REASON_COMPRESSION_FAILED = "CompressionFailed"
REASON_DEPLOYING = "Deploying"
REASON_PODS_NOT_READY = "PodsNotReady"
REASON_CANARY_STEP = "CanaryStep"
REASON_ANALYSIS_FAILED = "AnalysisFailed"
REASON_ANALYSIS_NO_DATA = "AnalysisNoData"
REASON_ANALYSIS_INCONCLUSIVE = "AnalysisInconclusive"
REASON_ANALYSIS_ERROR = "AnalysisError"
REASON_WAITING_FOR_TRAFFIC = "WaitingForTraffic"
REASON_PROGRESS_DEADLINE = "ProgressDeadlineExceeded"
REASON_ABORTED = "Aborted"
REASON_RESUMED_BY_PERSON = "ResumedByPerson"
REASON_SOURCE_AVAILABLE = "SourceAvailable"
REASON_INVALID_QUERY = "InvalidQuery"
REASON_ROLLED_BACK = "RolledBack"
REASON_PROMOTED = "Promoted"
REASON_SERVING = "Serving"
REASON_SCALED = "Scaled"
REASON_METRICS_OK = "MetricsOK"
REASON_NO_METRIC_DATA = "NoMetricData"

# --- Event types ---------------------------------------------------------------------
EVENT_NORMAL = "Normal"
EVENT_WARNING = "Warning"

# --- LeptonJob phases ------------------------------------------------------------------
PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_SCALING = "Scaling"
PHASE_RESTARTING = "Restarting"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASE_SUSPENDED = "Suspended"
JOB_PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_SCALING, PHASE_RESTARTING,
              PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED)
TERMINAL_PHASES = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

# --- LeptonModel phases ----------------------------------------------------------------
MPHASE_PENDING = "Pending"
MPHASE_COMPRESSING = "Compressing"
MPHASE_DEPLOYING = "Deploying"
MPHASE_PROGRESSING = "Progressing"
MPHASE_READY = "Ready"
MPHASE_DEGRADED = "Degraded"
MPHASE_ROLLING_BACK = "RollingBack"
MPHASE_FAILED = "Failed"
MPHASE_PAUSED = "Paused"           # a rollout waits for a person (rollout.onInconclusive: pause)
MODEL_PHASES = (MPHASE_PENDING, MPHASE_COMPRESSING, MPHASE_DEPLOYING, MPHASE_PROGRESSING,
                MPHASE_READY, MPHASE_DEGRADED, MPHASE_ROLLING_BACK, MPHASE_FAILED, MPHASE_PAUSED)

# Reasons of a condition that is False while work goes on as it should: their events are
# Normal, not Warning (a Warning is for what needs a person).
PROGRESS_REASONS = frozenset({REASON_COMPRESSING, REASON_WAITING_FOR_SOURCE})
