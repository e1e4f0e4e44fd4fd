//! The one place metrics are defined and registered.
//!
//! Names follow `slipway_<subsystem>_<name>_<unit>`; counters end in `_total`; latencies are
//! histograms with fsync-sized buckets (1 ms … 30 s). Label values are source and disk ids
//! (validated, bounded by what operators configure) or closed enums — never free text from a
//! peer. Per-disk gauges (state, backlog, lag) are refreshed from the live status right before
//! each scrape, so they can never drift from what `slipway status` shows.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for durations from 1 ms to 30 s (`slipway-backend`'s, so a backend's own
/// histograms match the server's).
pub use slipway_backend::LATENCY_BUCKETS;

/// All replication states a disk can be in (the `state` label's closed set).
pub const STATES: &[&str] = &[
    "initiating",
    "initial-sync",
    "backlog",
    "continuous",
    "creating-snapshot",
    "rescan",
    "paused",
    "stalled",
    "disconnected",
    "error",
];

/// Reasons a frame or request is refused (the `reason` label's closed set).
/// Values of the `mode` label of `slipway_disk_tracking`.
pub const TRACKING: &[&str] = &["kernel", "rescan", "none", "unknown"];

pub const REJECT_REASONS: &[&str] = &[
    "malformed",
    "too_large",
    "bad_checksum",
    "out_of_bounds",
    "misaligned",
    "unknown_disk",
    "bad_sequence",
    "unauthorized",
    "invalid_argument",
    "disk_mismatch",
    "limit",
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub received_bytes: IntCounterVec,
    pub received_writes: IntCounterVec,
    pub durable_bytes: IntCounterVec,
    pub fdatasyncs: IntCounter,
    pub flush_seconds: Histogram,
    pub ack_latency: Histogram,
    pub agents_connected: IntGauge,
    /// Sources whose cutover was finalized, as the server last saw them.
    pub sources_finalized: IntGauge,
    pub quic_connection_window: IntGauge,
    pub connections: IntCounterVec,
    pub rejected: IntCounterVec,
    pub disk_errors: IntCounterVec,
    pub throttle_wait_seconds: prometheus::Counter,
    pub disk_state: IntGaugeVec,
    pub disk_tracking: IntGaugeVec,
    pub backlog_bytes: IntGaugeVec,
    pub lag_seconds: prometheus::GaugeVec,
    pub disk_size_bytes: IntGaugeVec,
    pub replicated_bytes: IntGaugeVec,
    pub queued_bytes: IntGauge,
    /// Copy-on-write blocks of restore point captures: in memory now, and ever spilled to
    /// disk (both refreshed from the store at scrape time).
    pub capture_memory_bytes: IntGauge,
    pub capture_spilled_bytes: IntCounter,
    /// EBS attachment slots (`used`, `limit`); only on a backend with such a limit.
    pub attachment_slots: IntGaugeVec,
    /// 1, labelled with the fingerprint of the settings file the server runs with.
    pub settings_info: IntGaugeVec,
    pub restore_points: RestorePointMetrics,
}

/// Restore-point metrics (filled by the snapshot scheduler).
#[derive(Clone)]
pub struct RestorePointMetrics {
    pub taken: IntCounterVec,
    pub pruned: IntCounterVec,
    /// Prunes put off because an image uses the restore point's snapshots.
    pub prune_deferred: IntCounterVec,
    pub failed: IntCounterVec,
    pub snapshot_seconds: HistogramVec,
    pub pause_seconds: Histogram,
    /// How long agents kept their source's filesystems frozen for a marker (MarkerNote).
    pub freeze_seconds: HistogramVec,
    pub stored_bytes: IntGaugeVec,
    pub newest_age_seconds: prometheus::GaugeVec,
    pub count: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let disk = &["source", "disk"];
        let m = Metrics {
            received_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_disk_received_bytes_total",
                        "Payload bytes of write frames accepted for a disk (after decompression).",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            received_writes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_disk_received_writes_total",
                        "Write and zero frames accepted for a disk.",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            durable_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_disk_durable_bytes_total",
                        "Bytes made durable (fdatasync'd) on a disk's volume.",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            fdatasyncs: reg(
                &r,
                IntCounter::new(
                    "slipway_store_fdatasyncs_total",
                    "fdatasync calls on volumes (one covers many writes: group commit).",
                )
                .unwrap(),
            ),
            flush_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "slipway_store_flush_seconds",
                        "Duration of one fdatasync of a volume.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            ack_latency: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "slipway_ack_latency_seconds",
                        "Time from receiving a write to the durable ack that covers it.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            agents_connected: reg(
                &r,
                IntGauge::new(
                    "slipway_agents_connected",
                    "Agents with an authenticated connection.",
                )
                .unwrap(),
            ),
            sources_finalized: reg(
                &r,
                IntGauge::new(
                    "slipway_sources_finalized",
                    "Sources whose cutover was finalized (a restore point kept by `slipway cutover finalize`): refused, no more restore points.",
                )
                .unwrap(),
            ),
            quic_connection_window: reg(
                &r,
                IntGauge::new(
                    "slipway_quic_connection_window_bytes",
                    "Receive window of each live QUIC connection: quic.receive_memory shared by \
                     the connections, within [1 MiB, quic.connection_window].",
                )
                .unwrap(),
            ),
            connections: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_connections_total",
                        "Incoming connections by outcome (accepted, refused, failed).",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_rejected_total",
                        "Frames or requests refused, by reason. Nothing refused is written.",
                    ),
                    &["reason"],
                )
                .unwrap(),
            ),
            disk_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "slipway_disk_errors_total",
                        "Volume write or flush failures.",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            throttle_wait_seconds: reg(
                &r,
                prometheus::Counter::new(
                    "slipway_throttle_wait_seconds_total",
                    "Time receivers waited on the bandwidth throttle.",
                )
                .unwrap(),
            ),
            disk_state: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_disk_state",
                        "Replication state of a disk: 1 for its current state, 0 for the others.",
                    ),
                    &["source", "disk", "state"],
                )
                .unwrap(),
            ),
            disk_tracking: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_disk_tracking",
                        "How the agent finds a disk's changes: 1 for its current mode (kernel: writes tracked in the kernel; rescan: the disk is reread; none: one pass; unknown: not said or not connected), 0 for the others.",
                    ),
                    &["source", "disk", "mode"],
                )
                .unwrap(),
            ),
            backlog_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_disk_backlog_bytes",
                        "Bytes known changed at the source and not yet durable here.",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            lag_seconds: reg(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "slipway_disk_lag_seconds",
                        "Time since the disk was last continuous (0 while continuous).",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            disk_size_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("slipway_disk_size_bytes", "Size of the source disk."),
                    disk,
                )
                .unwrap(),
            ),
            replicated_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_disk_replicated_bytes",
                        "Bytes durably replicated in the current agent run.",
                    ),
                    disk,
                )
                .unwrap(),
            ),
            queued_bytes: reg(
                &r,
                IntGauge::new(
                    "slipway_queued_bytes",
                    "Write payload bytes received and not yet handed to a volume (bounded by replication.memory_limit).",
                )
                .unwrap(),
            ),
            capture_memory_bytes: reg(
                &r,
                IntGauge::new(
                    "slipway_capture_memory_bytes",
                    "Bytes of blocks restore point captures preserved in memory before the writer overwrote them (at most replication.capture_memory per disk being captured).",
                )
                .unwrap(),
            ),
            capture_spilled_bytes: reg(
                &r,
                IntCounter::new(
                    "slipway_capture_spilled_bytes_total",
                    "Bytes of preserved blocks restore point captures wrote to spill files (DATA_DIR/spill) beyond replication.capture_memory.",
                )
                .unwrap(),
            ),
            attachment_slots: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_ebs_attachment_slots",
                        "EBS attachment slots of this instance: used (root volume included) and the limit (less the network interfaces that share it on some types).",
                    ),
                    &["kind"],
                )
                .unwrap(),
            ),
            settings_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "slipway_settings_info",
                        "1, labelled with sha256: the fingerprint (first 8 bytes of SHA-256, hex) of the settings file the server runs with; `slipway template apply` compares it with the template.",
                    ),
                    &["sha256"],
                )
                .unwrap(),
            ),
            restore_points: RestorePointMetrics {
                taken: reg(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "slipway_restore_points_taken_total",
                            "Restore points created, by trigger (scheduled, on_demand).",
                        ),
                        &["source", "trigger"],
                    )
                    .unwrap(),
                ),
                pruned: reg(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "slipway_restore_points_pruned_total",
                            "Restore points deleted by the PIT policy or by an operator.",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
                prune_deferred: reg(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "slipway_restore_points_prune_deferred_total",
                            "Prunes put off because the restore point's snapshots are in use by an image (a launch); retried every 10 minutes until it is deregistered.",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
                failed: reg(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "slipway_restore_points_failed_total",
                            "Restore points that could not be taken.",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
                snapshot_seconds: reg(
                    &r,
                    HistogramVec::new(
                        HistogramOpts::new(
                            "slipway_snapshot_duration_seconds",
                            "Time to take a restore point, from request to manifest written.",
                        )
                        .buckets(LATENCY_BUCKETS.to_vec()),
                        &["source"],
                    )
                    .unwrap(),
                ),
                pause_seconds: reg(
                    &r,
                    Histogram::with_opts(
                        HistogramOpts::new(
                            "slipway_snapshot_pause_seconds",
                            "Time the appliers of a source were held at a marker for a snapshot.",
                        )
                        .buckets(LATENCY_BUCKETS.to_vec()),
                    )
                    .unwrap(),
                ),
                freeze_seconds: reg(
                    &r,
                    HistogramVec::new(
                        HistogramOpts::new(
                            "slipway_source_freeze_seconds",
                            "Time a source's filesystems were frozen for a restore point's marker, as its agent reported it.",
                        )
                        .buckets(LATENCY_BUCKETS.to_vec()),
                        &["source"],
                    )
                    .unwrap(),
                ),
                stored_bytes: reg(
                    &r,
                    IntGaugeVec::new(
                        Opts::new(
                            "slipway_restore_points_stored_bytes",
                            "Block bytes held by the local snapshot store for a source.",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
                newest_age_seconds: reg(
                    &r,
                    prometheus::GaugeVec::new(
                        Opts::new(
                            "slipway_restore_point_newest_age_seconds",
                            "Age of the newest restore point of a source (the recovery point objective).",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
                count: reg(
                    &r,
                    IntGaugeVec::new(
                        Opts::new(
                            "slipway_restore_points",
                            "Restore points currently kept for a source.",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                ),
            },
            registry: r,
        };
        // Process CPU, memory and file descriptors (Linux /proc), for capacity planning.
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        for reason in REJECT_REASONS {
            m.rejected.with_label_values(&[reason]);
        }
        for o in ["accepted", "refused", "failed"] {
            m.connections.with_label_values(&[o]);
        }
        m
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }

    /// Registers a backend's own metrics (the AWS backend's request counters; once, at
    /// start). The backend defines them (it cannot depend on the server); this registry
    /// serves them with the rest.
    pub fn register_backend(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("a backend metric's name collides with a server metric");
    }

    pub fn reject(&self, reason: &str) {
        debug_assert!(REJECT_REASONS.contains(&reason), "{reason}");
        self.rejected.with_label_values(&[reason]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
