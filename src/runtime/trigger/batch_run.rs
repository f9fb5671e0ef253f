//! One batch run: the pipeline's data (`messages`, `count`, `broker_ref`), in-progress acks
//! while it runs, then each message settled on its own by what the run and the pipeline did.

use super::batch::Mark;
use super::run::Handler;
use super::{payload, AckMode, TriggerCall};
use crate::runtime::provider::{AckKind, Delivered, Include, Origin, Provider};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use std::time::Duration;

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

impl<P: Provider> Handler<P> {
    pub(super) async fn handle_batch(&self, msgs: Vec<P::Delivery>) {
        let mut values = Vec::with_capacity(msgs.len());
        let mut items = Vec::with_capacity(msgs.len());
        for d in msgs {
            let mut m = d.to_message(&self.spec.durable, Include::ALL);
            drop(self.tm.deliver(&mut m));
            let origin = Origin::of(&m);
            items.push((d, origin));
            // No per-message broker_ref: each entry must decode as a Message (the ack step's
            // `messages` input); the batch carries it once at the top.
            values.push(Value {
                kind: Some(Kind::StructValue(payload::build(m, ""))),
            });
        }
        let tokens: Vec<String> = items.iter().map(|(_, o)| o.token.clone()).collect();
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
        futures::future::join_all(
            items
                .iter()
                .zip(fates)
                .map(|((d, origin), fate)| async move {
                    match (fate, result) {
                        (Mark::Settled, _) => {}
                        (Mark::Failed, _) => self.fail_message(d, origin, marked).await,
                        (Mark::Held, Err(err)) => self.fail_message(d, origin, err).await,
                        (Mark::Held, Ok(())) => {
                            if self.spec.ack_mode == AckMode::Auto {
                                self.settle(&origin.token, AckKind::Ack).await;
                            }
                        }
                    }
                }),
        )
        .await;
    }
}
