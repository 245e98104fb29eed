{{/* onejump chart helpers */}}

{{- define "onejump.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "onejump.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "onejump.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onejump.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "onejump.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "onejump.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
onejump/flavor: {{ include "onejump.flavorName" . }}
{{- end -}}

{{- define "onejump.flavorName" -}}
{{- if not (hasKey .Values.flavors .Values.flavor) -}}
{{- fail (printf "flavor=%q: expected one of %s" .Values.flavor (keys .Values.flavors | sortAlpha | join ", ")) -}}
{{- end -}}
{{- .Values.flavor -}}
{{- end -}}

{{/* the values of the chosen flavor (cpu | gpu) */}}
{{- define "onejump.flavor" -}}
{{- toYaml (index .Values.flavors (include "onejump.flavorName" .)) -}}
{{- end -}}

{{- define "onejump.image" -}}
{{- $flavor := include "onejump.flavor" . | fromYaml -}}
{{- printf "%s:%s" .Values.image.repository $flavor.tag -}}
{{- end -}}

{{- define "onejump.claimName" -}}
{{- .Values.model.volume.existingClaim | default (printf "%s-models" (include "onejump.fullname" .)) -}}
{{- end -}}

{{/* non-root (the image's user onejump, uid 10001), read-only root filesystem, no capabilities */}}
{{- define "onejump.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "onejump.securityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* where the API key's Secret is mounted as a file (ONEJUMP_API_KEY_FILE) */}}
{{- define "onejump.apiKeyFile" -}}
{{- printf "%s/api-key" .Values.apiKey.mountPath -}}
{{- end -}}

{{/*
The /ready check. Without an API key an httpGet; with one, /ready answers 401 to a probe without the key and
kubelet's httpGet headers cannot come from a Secret, so an exec probe sends the key read from ONEJUMP_API_KEY_FILE
with Python's urllib (the image has no curl). urlopen raises on any status >= 400: the probe fails with a non-zero
exit.
*/}}
{{- define "onejump.readyCheck" -}}
{{- if .Values.apiKey.existingSecret -}}
exec:
  command:
    - python
    - -c
    - "import os, urllib.request as u; k = open(os.environ['ONEJUMP_API_KEY_FILE']).read().strip(); u.urlopen(u.Request('http://127.0.0.1:%s/ready' % os.environ['ONEJUMP_PORT'], headers={'Authorization': 'Bearer ' + k}), timeout=4)"
{{- else -}}
httpGet:
  path: /ready
  port: http
{{- end -}}
{{- end -}}

{{/* the query that KEDA reads: requests in flight (being decoded + queued) in this release's pods */}}
{{- define "onejump.inFlightQuery" -}}
{{- $sel := printf "{namespace=%q,service=%q}" .Release.Namespace (include "onejump.fullname" .) -}}
sum(onejump_num_requests_running{{ $sel }}) + sum(onejump_num_requests_waiting{{ $sel }})
{{- end -}}
