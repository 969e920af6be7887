//! The routing slip: what a workflow message carries so that any instance can run it, in
//! headers (the itinerary, the compensation log, the caller's reply address), and the
//! workflow context in the body (the input and every completed step's output).

use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};

use crate::error::HandlerError;
use crate::headers;

/// The routing slip of one workflow message (serializable too: a fan-out step keeps it in the
/// store for its join).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct Slip {
    /// The workflow's name (its entry queue).
    pub workflow: String,
    /// The workflow id: the entry message's `message_id`.
    pub id: String,
    /// The step this message runs (or, on a compensation message, undoes).
    pub step: String,
    /// The steps after `step`, in order.
    pub itinerary: Vec<String>,
    /// Completed steps that have a compensation, most recent first; on a compensation
    /// message, the ones still to undo after `step`.
    pub compensations: Vec<String>,
    /// Compensation messages: steps undone so far, in the order they were undone.
    pub compensated: Vec<String>,
    /// Compensation messages: steps whose compensation was dead-lettered.
    pub compensation_failed: Vec<String>,
    /// Compensation messages: the failure that started the compensation.
    pub failure: Option<Failure>,
    /// The caller's reply address, kept apart from the message's own properties.
    pub caller: Caller,
    /// When the workflow started, ms since the epoch.
    pub started_ms: u64,
}

/// The step failure that made a workflow compensate.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct Failure {
    /// The step that failed (`finish` when the final output could not be built).
    pub step: String,
    /// Its error kind.
    pub kind: String,
    /// Its error message.
    pub message: String,
    /// A fan-out step: the index of its first failed child.
    pub index: Option<u64>,
}

/// Where the workflow's progress and final replies go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct Caller {
    /// The entry message's `reply_to`.
    pub reply_to: Option<String>,
    /// The entry message's `correlation_id`.
    pub correlation_id: Option<String>,
}

/// The body of every step and compensation message: the workflow's input and the output of
/// each completed step, by step name. Steps read what they need with the
/// [`Input`](super::Input), [`Context`](super::Context) and [`Recorded`](super::Recorded)
/// extractors.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub(crate) struct Body {
    /// The entry message's body.
    pub input: serde_json::Value,
    /// Completed steps' outputs.
    #[serde(default)]
    pub results: serde_json::Map<String, serde_json::Value>,
}

impl Slip {
    /// The headers that carry the slip (the message's own properties are set apart).
    pub(crate) fn to_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        headers::set_string(&mut table, headers::WORKFLOW, self.workflow.as_str());
        headers::set_string(&mut table, headers::WORKFLOW_ID, self.id.as_str());
        headers::set_string(&mut table, headers::WORKFLOW_STEP, self.step.as_str());
        headers::set_strings(&mut table, headers::WORKFLOW_ITINERARY, &self.itinerary);
        headers::set_strings(
            &mut table,
            headers::WORKFLOW_COMPENSATIONS,
            &self.compensations,
        );
        headers::set_int(&mut table, headers::WORKFLOW_STARTED, self.started_ms);
        if let Some(reply_to) = &self.caller.reply_to {
            headers::set_string(&mut table, headers::WORKFLOW_REPLY_TO, reply_to.as_str());
        }
        if let Some(id) = &self.caller.correlation_id {
            headers::set_string(&mut table, headers::WORKFLOW_CORRELATION_ID, id.as_str());
        }
        if let Some(failure) = &self.failure {
            headers::set_strings(&mut table, headers::WORKFLOW_COMPENSATED, &self.compensated);
            headers::set_strings(
                &mut table,
                headers::WORKFLOW_COMPENSATION_FAILED,
                &self.compensation_failed,
            );
            headers::set_string(
                &mut table,
                headers::WORKFLOW_FAILED_STEP,
                failure.step.as_str(),
            );
            headers::set_string(
                &mut table,
                headers::WORKFLOW_ERROR_KIND,
                failure.kind.as_str(),
            );
            headers::set_string(
                &mut table,
                headers::WORKFLOW_ERROR,
                failure.message.as_str(),
            );
            if let Some(index) = failure.index {
                headers::set_int(&mut table, headers::WORKFLOW_FAILED_INDEX, index);
            }
        }
        table
    }

    /// Reads the slip of a step or compensation message; a message without one (published
    /// by hand to a step queue, or mangled) is invalid input.
    pub(crate) fn from_headers(table: Option<&FieldTable>) -> Result<Self, HandlerError> {
        let text = |name: &str| {
            headers::get_string(table, name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| missing(name))
        };
        let list = |name: &str| headers::get_strings(table, name).ok_or_else(|| missing(name));
        let failure = match headers::get_string(table, headers::WORKFLOW_FAILED_STEP) {
            Some(step) => Some(Failure {
                step,
                kind: text(headers::WORKFLOW_ERROR_KIND)?,
                message: headers::get_string(table, headers::WORKFLOW_ERROR).unwrap_or_default(),
                index: headers::get_u64(table, headers::WORKFLOW_FAILED_INDEX),
            }),
            None => None,
        };
        let optional_list = |name: &str| headers::get_strings(table, name).unwrap_or_default();
        Ok(Slip {
            workflow: text(headers::WORKFLOW)?,
            id: text(headers::WORKFLOW_ID)?,
            step: text(headers::WORKFLOW_STEP)?,
            itinerary: list(headers::WORKFLOW_ITINERARY)?,
            compensations: list(headers::WORKFLOW_COMPENSATIONS)?,
            compensated: optional_list(headers::WORKFLOW_COMPENSATED),
            compensation_failed: optional_list(headers::WORKFLOW_COMPENSATION_FAILED),
            failure,
            caller: Caller {
                reply_to: headers::get_string(table, headers::WORKFLOW_REPLY_TO)
                    .filter(|v| !v.is_empty()),
                correlation_id: headers::get_string(table, headers::WORKFLOW_CORRELATION_ID),
            },
            started_ms: headers::get_u64(table, headers::WORKFLOW_STARTED).unwrap_or(0),
        })
    }
}

fn missing(name: &str) -> HandlerError {
    HandlerError::invalid_input(format!(
        "not a workflow message: header {name} is missing or malformed"
    ))
}

impl Body {
    /// Reads a step or compensation message's body.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, HandlerError> {
        serde_json::from_slice(bytes).map_err(|e| {
            HandlerError::invalid_input(format!(
                "workflow message body is not {{\"input\", \"results\"}}: {e}"
            ))
        })
    }

    /// The body as JSON bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        // A `Value` and a map of `Value`s always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slip() -> Slip {
        Slip {
            workflow: "bookings".into(),
            id: "b-1".into(),
            step: "flight".into(),
            itinerary: vec!["payment".into()],
            compensations: vec!["hotel".into()],
            compensated: vec![],
            compensation_failed: vec![],
            failure: None,
            caller: Caller {
                reply_to: Some("amq.rabbitmq.reply-to.x".into()),
                correlation_id: Some("c-1".into()),
            },
            started_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn slips_round_trip_through_headers() {
        let step = slip();
        assert_eq!(
            Slip::from_headers(Some(&step.to_headers())),
            Ok(step.clone())
        );
        let compensation = Slip {
            step: "hotel".into(),
            itinerary: vec![],
            compensations: vec![],
            compensated: vec!["flight".into()],
            compensation_failed: vec!["car".into()],
            failure: Some(Failure {
                step: "payment".into(),
                kind: "declined".into(),
                message: "card declined".into(),
                index: Some(3),
            }),
            caller: Caller::default(),
            ..step
        };
        assert_eq!(
            Slip::from_headers(Some(&compensation.to_headers())),
            Ok(compensation)
        );
    }

    #[test]
    fn a_message_without_a_slip_is_invalid_input() {
        let error = Slip::from_headers(None).unwrap_err();
        assert_eq!(error.kind(), "invalid_input");
        let mut table = slip().to_headers();
        table.insert(
            headers::WORKFLOW_ITINERARY.into(),
            lapin::types::AMQPValue::LongLongInt(3),
        );
        assert!(Slip::from_headers(Some(&table))
            .unwrap_err()
            .message()
            .contains(headers::WORKFLOW_ITINERARY));
    }

    #[test]
    fn bodies_need_an_input_and_default_their_results() {
        let body = Body::parse(br#"{"input": {"trip_id": "t-1"}}"#).unwrap();
        assert_eq!(body.input["trip_id"], "t-1");
        assert!(body.results.is_empty());
        assert_eq!(Body::parse(&body.to_bytes()).unwrap(), body);
        assert!(Body::parse(b"\"text\"").is_err());
    }
}
