{{/* The release's base name. */}}
{{- define "wicket.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries; pass (dict "root" $ "component" "control"). */}}
{{- define "wicket.labels" -}}
app.kubernetes.io/name: wicket
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Selector labels; pass (dict "root" $ "component" "control"). */}}
{{- define "wicket.selector" -}}
app.kubernetes.io/name: wicket
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image; pass (dict "root" $ "name" "wicket-control"). */}}
{{- define "wicket.image" -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.repository) .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{/* The control service's in-cluster gRPC URL. */}}
{{- define "wicket.controlUrl" -}}
{{- printf "%s://%s-control.%s.svc:%v" (ternary "https" "http" .Values.control.tls.enabled) (include "wicket.fullname" .) .Release.Namespace .Values.control.service.port -}}
{{- end -}}

{{/* The Secret (in each gate's namespace) holding the control service's CA. */}}
{{- define "wicket.controlCaSecret" -}}
{{- printf "%s-control-ca" (include "wicket.fullname" .) -}}
{{- end -}}

{{/* The control service's serving Secret. */}}
{{- define "wicket.controlTlsSecret" -}}
{{- default (printf "%s-control-tls" (include "wicket.fullname" .)) .Values.control.tls.existingSecret -}}
{{- end -}}

{{/* The issuer, required. */}}
{{- define "wicket.issuer" -}}
{{- required "oidc.issuer is required: the URL of the identity provider whose tokens Wicket accepts" .Values.oidc.issuer -}}
{{- end -}}

{{/* The policy's name for a gate protocol. */}}
{{- define "wicket.policyProtocol" -}}
{{- get (dict "pg" "postgres" "ssh" "ssh" "k8s" "kubernetes" "http" "http") . -}}
{{- end -}}

{{/* The resources with their namespace filled in, as JSON (a list). */}}
{{- define "wicket.resources" -}}
{{- $out := list -}}
{{- range .Values.resources -}}
{{- $r := deepCopy . -}}
{{- $_ := set $r "namespace" (default $.Release.Namespace .namespace) -}}
{{- $out = append $out $r -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Pod-level security every Wicket pod runs with. */}}
{{- define "wicket.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security every Wicket container runs with. */}}
{{- define "wicket.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}
