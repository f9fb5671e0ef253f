//! One batch run: the pipeline's data (`messages`, `count`, `broker_ref`), in-progress acks
//! while it runs, then each message settled on its own by what the run and the pipeline did.

use super::batch::Mark;
use super::run::{Handler, Origin};
use super::{payload, AckMode, TriggerCall};
use crate::nats::ack::AckKind;
use crate::runtime::steps::consume::{to_message, Include};
use async_nats::jetstream::Message as JsMessage;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use std::time::Duration;

/// One message of a running batch: what its settlement needs.
struct Item {
    msg: JsMessage,
    origin: Origin,
    token: String,
    delivered: i64,
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

impl Handler {
    pub(super) async fn handle_batch(&self, msgs: Vec<JsMessage>) {
        let mut values = Vec::with_capacity(msgs.len());
        let mut items = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let mut m = to_message(&msg, &self.spec.durable, Include::ALL);
            drop(self.tm.deliver(&mut m));
            let origin = Origin {
                subject: m.subject.clone(),
                stream: m.stream.clone(),
                sequence: m.sequence.clone(),
                delivery_count: m.delivery_count,
            };
            let token = m.ack_token.clone();
            items.push(Item {
                msg,
                origin,
                token,
                delivered: m.delivery_count as i64,
            });
            // No per-message broker_ref: each entry must decode as a Message (the ack step's
            // `messages` input); the batch carries it once at the top.
            values.push(Value {
                kind: Some(Kind::StructValue(payload::build(m, ""))),
            });
        }
        let tokens: Vec<String> = items.iter().map(|i| i.token.clone()).collect();
        let launcher = self.launcher.clone();
        let mut data = Struct::default();
        data.fields.insert(
            "count".into(),
            Value {
                kind: Some(Kind::NumberValue(items.len() as f64)),
            },
        );
        data.fields.insert("messages".into(), list(values));
        if !self.spec.broker_ref.is_empty() {
            data.fields.insert(
                "broker_ref".into(),
                Value {
                    kind: Some(Kind::StringValue(self.spec.broker_ref.clone())),
                },
            );
        }
        let marks = self.rt.batch_marks();
        marks.hold(tokens.iter().map(String::as_str));
        let call = TriggerCall {
            trigger_type: self.spec.workflow_type.clone(),
            action: "batch".into(),
            data,
        };
        // Keep the messages ours while the run lasts (in-progress acks at ack_wait/2), except
        // those the pipeline already acked or terminated.
        let progress_every = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        let run = self.tm.run();
        let pipeline = launcher.launch(call);
        tokio::pin!(pipeline);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let result = loop {
            tokio::select! {
                r = &mut pipeline => break r,
                _ = ticker.tick() => {
                    let open = marks.unsettled(&tokens);
                    futures::future::join_all(open.iter().map(|t| self.progress(t))).await;
                }
            }
        };
        run.finish(result.is_ok());
        let fates = marks.release(&tokens);
        if let Err(err) = &result {
            tracing::warn!(trigger = %self.spec.workflow_type, messages = items.len(), error = %err, "batch pipeline failed");
        }
        let marked = "marked failed by the pipeline (step.eventbus.ack nak)";
        let result = &result;
        futures::future::join_all(items.iter().zip(fates).map(|(item, fate)| async move {
            match (fate, result) {
                (Mark::Settled, _) => {}
                (Mark::Failed, _) => self.fail(item, marked).await,
                (Mark::Held, Err(err)) => self.fail(item, err).await,
                (Mark::Held, Ok(())) => {
                    if self.spec.ack_mode == AckMode::Auto {
                        self.settle(&item.token, AckKind::Ack).await;
                    }
                }
            }
        }))
        .await;
    }

    async fn fail(&self, item: &Item, err: &str) {
        self.fail_message(&item.msg, &item.origin, &item.token, item.delivered, err)
            .await;
    }
}
