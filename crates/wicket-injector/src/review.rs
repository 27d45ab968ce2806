//! One `admission.k8s.io/v1` AdmissionReview in, one out.
//!
//! - A pod asking for a gate gets a JSON Patch that adds it.
//! - A pod asking for nothing, one already injected, and any operation but
//!   CREATE (a pod's containers cannot change after it is created) are let
//!   through unchanged.
//! - A pod asking for something wrong (an unknown protocol, a bad port, a
//!   missing connection), an object that is not a pod, or a pod that does
//!   not decode is denied with a message saying why: a pod that asked for a
//!   gate never runs without one.
//! - A body that is not an AdmissionReview at all gets HTTP 400 (there is
//!   no request uid to answer); the API server then applies the webhook's
//!   `failurePolicy`, which the chart sets to `Fail`.

use k8s_openapi::api::core::v1::Pod;
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::response::StatusSummary;

use crate::inject::{Injection, Outcome, Plan, STATUS, decide as decide_pod};
use crate::settings::Settings;

/// What happened to one review, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The gate was added.
    Injected(Plan),
    /// Let through unchanged, and why.
    Skipped(&'static str),
    /// Refused, and why.
    Denied(String),
}

/// The review's answer and what was decided.
#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back (JSON).
    pub body: Vec<u8>,
    /// The decision.
    pub verdict: Verdict,
    /// `namespace/name` (or `generateName…`) of the pod, for logs.
    pub pod: String,
    /// The request's uid.
    pub uid: String,
}

const API_VERSION: &str = "admission.k8s.io/v1";

/// Answers one review. `Err` is a body that is not a v1 AdmissionReview
/// with a request (answer it with HTTP 400 and the message).
pub fn answer(body: &[u8], settings: &Settings) -> Result<Answer, String> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an AdmissionReview: {e}"))?;
    if review.types.api_version != API_VERSION || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected an {API_VERSION} AdmissionReview, got {} {}",
            review.types.api_version, review.types.kind
        ));
    }
    let req: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| "the AdmissionReview carries no request".to_string())?;
    let namespace = req
        .namespace
        .clone()
        .or_else(|| {
            req.object
                .as_ref()
                .and_then(|o| o.metadata.namespace.clone())
        })
        .unwrap_or_default();
    let pod_name = req
        .object
        .as_ref()
        .and_then(|o| {
            o.metadata
                .name
                .clone()
                .or_else(|| o.metadata.generate_name.as_ref().map(|g| format!("{g}…")))
        })
        .unwrap_or_else(|| req.name.clone());
    let verdict = decide(&req, &namespace, settings);
    let response = AdmissionResponse::from(&req);
    let response = match &verdict {
        Ok((v, None)) => Ok((response, v.clone())),
        Ok((v, Some(patch))) => response
            .with_patch(patch.clone())
            .map(|r| (r, v.clone()))
            .map_err(|e| format!("cannot encode the patch: {e}")),
        Err(reason) => Err(reason.clone()),
    };
    let (response, verdict) = match response {
        Ok(ok) => ok,
        Err(reason) => {
            let mut r = AdmissionResponse::from(&req).deny(&reason);
            r.result.code = 403;
            r.result.reason = "Forbidden".into();
            r.result.status = Some(StatusSummary::Failure);
            (r, Verdict::Denied(reason))
        }
    };
    let body = encode(response).map_err(|e| format!("cannot encode the answer: {e}"))?;
    Ok(Answer {
        body,
        verdict,
        pod: format!("{namespace}/{pod_name}"),
        uid: req.uid,
    })
}

/// The review as JSON, with the patch as the base64 string the API server's
/// `[]byte` field is documented as (kube-core writes an array of numbers).
fn encode(response: AdmissionResponse) -> Result<Vec<u8>, serde_json::Error> {
    use base64::Engine;
    let patch = response
        .patch
        .as_ref()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(p));
    let mut review = serde_json::to_value(response.into_review())?;
    if let (Some(p), Some(r)) = (patch, review.get_mut("response")) {
        r["patch"] = serde_json::Value::String(p);
    }
    serde_json::to_vec(&review)
}

type Decision = Result<(Verdict, Option<json_patch::Patch>), String>;

fn decide(req: &AdmissionRequest<DynamicObject>, namespace: &str, settings: &Settings) -> Decision {
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" || req.resource.resource != "pods" {
        return Err(format!(
            "the Wicket injector only mutates pods, not {}/{} {}",
            req.kind.group, req.kind.version, req.kind.kind
        ));
    }
    if req.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
        return Ok((Verdict::Skipped("a subresource"), None));
    }
    if req.operation != Operation::Create {
        return Ok((Verdict::Skipped("not a CREATE"), None));
    }
    let Some(object) = &req.object else {
        return Err("the request carries no pod".into());
    };
    let original = serde_json::to_value(object).map_err(|e| format!("cannot read the pod: {e}"))?;
    let pod: Pod = as_pod(&original)?;
    match decide_pod(&pod, namespace, settings)? {
        Outcome::Skip(why) => Ok((Verdict::Skipped(why), None)),
        Outcome::Inject(gate) => {
            let patch = patch(&original, &gate)?;
            Ok((Verdict::Injected(gate.plan), Some(patch)))
        }
    }
}

/// The JSON Patch adding `gate` to `original`: only `add` operations, so
/// nothing the API server sent is rewritten (not even fields newer than this
/// crate's Pod type).
pub fn patch(original: &serde_json::Value, gate: &Injection) -> Result<json_patch::Patch, String> {
    use serde_json::{Value, json};
    let has = |ptr: &str| original.pointer(ptr).is_some_and(|v| !v.is_null());
    let container = serde_json::to_value(&gate.container).map_err(|e| e.to_string())?;
    let mut ops = Vec::new();
    match (gate.plan.native, has("/spec/initContainers")) {
        (true, true) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}))
        }
        (true, false) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}))
        }
        (false, _) => {
            ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": container}))
        }
    }
    let volumes: Vec<Value> = gate
        .volumes
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if has("/spec/volumes") {
        ops.extend(
            volumes
                .into_iter()
                .map(|v| json!({"op": "add", "path": "/spec/volumes/-", "value": v})),
        );
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    if has("/metadata/annotations") {
        ops.push(json!({"op": "add", "path": "/metadata/annotations/wicket.dev~1status", "value": "injected"}));
    } else {
        ops.push(
            json!({"op": "add", "path": "/metadata/annotations", "value": {STATUS: "injected"}}),
        );
    }
    serde_json::from_value(Value::Array(ops)).map_err(|e| format!("cannot build the patch: {e}"))
}

fn as_pod(v: &serde_json::Value) -> Result<Pod, String> {
    serde::Deserialize::deserialize(v).map_err(|e| format!("the object is not a valid pod: {e}"))
}
