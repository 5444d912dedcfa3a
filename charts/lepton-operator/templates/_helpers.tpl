{{- define "lepton-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lepton-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lepton-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lepton-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lepton-operator.labels" -}}
{{ include "lepton-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lepton-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lepton-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The operator image: repository@digest when image.digest is set (it wins over the tag),
else repository:tag (the chart's appVersion when the tag is empty).
*/}}
{{- define "lepton-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Rules for the namespaced objects the operator reads and writes. */}}
{{- define "lepton-operator.namespacedRules" -}}
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs", "leptonmodels"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs/status", "leptonmodels/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The tail of a Running compression pod's log: its progress (lepton_operator.model.progress).
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Each job's rendezvous token (<job>-rdzv): created once, read back by name after a
# restart; never listed or watched, so no other Secret is ever read.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling.x-k8s.io"]
  resources: ["provisioningrequests"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["podtemplates"]
  verbs: ["create", "patch", "delete"]
{{- end -}}

{{/*
Security contexts: the hardened defaults with the user's fields on top, so an empty or
null value never removes the hardening; hardening.enabled=false uses the user's values
alone.
*/}}
{{- define "lepton-operator.podSecurityContext" -}}
{{- $user := .Values.podSecurityContext | default dict -}}
{{- if .Values.hardening.enabled -}}
{{- $hard := dict "runAsNonRoot" true "runAsUser" 65532 "runAsGroup" 65532 "fsGroup" 65532 "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- toYaml (mergeOverwrite $hard (deepCopy $user)) -}}
{{- else -}}
{{- toYaml $user -}}
{{- end -}}
{{- end }}

{{- define "lepton-operator.securityContext" -}}
{{- $user := .Values.securityContext | default dict -}}
{{- if .Values.hardening.enabled -}}
{{- $hard := dict "allowPrivilegeEscalation" false "privileged" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) -}}
{{- toYaml (mergeOverwrite $hard (deepCopy $user)) -}}
{{- else -}}
{{- toYaml $user -}}
{{- end -}}
{{- end }}
