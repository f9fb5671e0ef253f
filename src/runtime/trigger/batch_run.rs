//! One batch: the pipeline's data (`messages`, `count`, `broker_ref`) fitted to the host's
//! callback limit (split into several runs when it does not fit one), in-progress acks while a
//! run lasts, then each message settled on its own by what its run and the pipeline did.

use super::batch::Mark;
use super::run::Handler;
use super::{payload, AckMode, TriggerCall};
use crate::runtime::provider::{AckKind, Delivered, Origin, Provider};
use std::time::Duration;

impl<P: Provider> Handler<P> {
    /// Runs a collected batch: each message fitted to the host's callback limit (one that
    /// cannot fit even alone is refused as in one-message delivery), then one run, or several
    /// in turn when the batch's call would exceed the limit.
    pub(super) async fn handle_batch(&self, msgs: Vec<P::Delivery>) {
        let sizer = payload::BatchSizer::new(
            &self.spec.workflow_type,
            &self.spec.broker_ref,
            self.launcher.max_call_bytes(),
        );
        let mut entries = Vec::with_capacity(msgs.len());
        let mut items = Vec::with_capacity(msgs.len());
        for d in msgs {
            let mut m = d.to_message(&self.spec.durable, self.spec.include);
            drop(self.tm.deliver(&mut m));
            let origin = Origin::of(&m);
            // No per-message broker_ref: each entry must decode as a Message (the ack step's
            // `messages` input); the batch carries it once at the top.
            let mut entry = payload::build(m, "");
            if let Err(too_large) = sizer.fit_entry(&mut entry) {
                self.refuse_too_large(&d, &origin, too_large).await;
                continue;
            }
            entries.push(entry);
            items.push((d, origin));
        }
        let runs = sizer.runs(&self.spec.workflow_type, &self.spec.broker_ref, entries);
        let tokens: Vec<String> = items.iter().map(|(_, o)| o.token.clone()).collect();
        let marks = self.rt.batch_marks();
        marks.hold(tokens.iter().map(String::as_str));
        if runs.len() > 1 {
            tracing::debug!(trigger = %self.spec.workflow_type, messages = items.len(), runs = runs.len(), "batch split to fit the host's callback limit");
        }
        let mut first = 0;
        for (n, call) in runs {
            if first > 0 && self.stop.is_cancelled() {
                // Stopping: no new run starts; the rest are redelivered after ack_wait.
                marks.release(&tokens[first..]);
                tracing::debug!(trigger = %self.spec.workflow_type, left = tokens.len() - first, "trigger stopping; the rest of the split batch is left for redelivery");
                break;
            }
            let own = first..first + n;
            // The later runs' messages wait in our hands: keep them too.
            self.run_batch(call, &items[own.clone()], &tokens[own], &tokens[first..])
                .await;
            first += n;
        }
    }

    /// One run: in-progress acks for `open` while it lasts, then each of `items` settled by
    /// what the run and the pipeline did.
    async fn run_batch(
        &self,
        call: TriggerCall,
        items: &[(P::Delivery, Origin)],
        own: &[String],
        open: &[String],
    ) {
        let marks = self.rt.batch_marks();
        // Keep the messages ours while the run lasts (in-progress acks at ack_wait/2), except
        // those the pipeline already acked or terminated.
        let progress_every = (self.bound.ack_wait / 2).max(Duration::from_millis(100));
        let run = self.tm.run();
        let pipeline = self.launcher.launch(call);
        tokio::pin!(pipeline);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let result = loop {
            tokio::select! {
                r = &mut pipeline => break r,
                _ = ticker.tick() => {
                    let open = marks.unsettled(open);
                    futures::future::join_all(open.iter().map(|t| self.progress(t))).await;
                }
            }
        };
        run.finish(result.is_ok());
        let fates = marks.release(own);
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
