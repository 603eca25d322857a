//! [`GpuStage`]: the stage server's [`StageCompute`] on a CUDA device, the device model of one
//! layer range with its device KV cache.
//!
//! Input rows arrive on the host (tokens, or hidden states and the compressed relay from the
//! previous stage over gRPC) and are uploaded, or arrive on the device over the NCCL data
//! plane, the relayed top-k rows with them (their shapes checked on the host against the
//! announcement, their values on the device by `validate_topk_rows` before any kernel indexes
//! the KV cache with them: 1..=ld slots per row, no position past the row's own); a middle
//! stage downloads its output hidden states and relay for gRPC (the relay travels compressed
//! in the request) or sends both over NCCL, device to device (the request then carries only
//! their shapes, see `crate::stage::PeerInput`); the last stage keeps its hidden states on the
//! device and brings back only the logits rows the sampler needs, as [`super::GpuBackend`]
//! does for the engine.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::attention::DevTopk;
use super::backend::{cache_blocks_for, GpuEngineOptions};
use super::cache::DeviceKvCache;
use super::model::{dev, GpuModel};
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::model::{LayerRange, Segment};
use crate::pattern::IndexPattern;
use crate::stage::data_plane::PeerLink;
use crate::stage::{BatchInput, BatchOutput, BatchSink, CacheStats, PeerInput, RelayShape, StageCompute, StageDevice};
use kernels::cuda::CudaSlice;

/// One segment's relayed top-k rows as received over NCCL.
struct ReceivedRelay {
    /// Index into the batch's segments.
    segment: usize,
    /// `rows × ld` positions.
    sel: CudaSlice<u32>,
    /// Per row, the positions used.
    lens: CudaSlice<i32>,
    ld: usize,
}

/// One layer range on a GPU with its KV cache (`None` only between `free_cache` and
/// `allocate_cache` during a `Reconfigure`).
pub struct GpuStage {
    model: GpuModel,
    cache: Mutex<Option<DeviceKvCache>>,
    opts: GpuEngineOptions,
}

impl GpuStage {
    /// Loads layers `range` of the checkpoint in `dir` onto device `opts.ordinal` and
    /// allocates its KV cache: as many blocks as `opts.memory_fraction` leaves after the
    /// weights and workspace, at most `opts.max_blocks`.
    pub fn load(
        dir: &Path,
        cfg: ModelConfig,
        pattern: Option<&str>,
        range: LayerRange,
        opts: GpuEngineOptions,
    ) -> Result<Self> {
        let stage = Self::load_weights(dir, cfg, pattern, range, opts)?;
        stage.allocate_cache()?;
        Ok(stage)
    }

    /// Loads the weights only (no cache yet).
    fn load_weights(
        dir: &Path,
        cfg: ModelConfig,
        pattern: Option<&str>,
        range: LayerRange,
        opts: GpuEngineOptions,
    ) -> Result<Self> {
        let model = GpuModel::load_range(dir, cfg, pattern, range, opts.ordinal, opts.weight_dtype)?;
        Ok(GpuStage {
            model,
            cache: Mutex::new(None),
            opts,
        })
    }

    /// The device model.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    fn cache(&self) -> MutexGuard<'_, Option<DeviceKvCache>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Receives `floats` hidden-state values from the previous stage over `link`.
    fn receive(&self, floats: usize, link: &PeerLink) -> Result<CudaSlice<f32>> {
        if floats == 0 {
            return Err(WorkerError::invalid(
                "nccl.hidden_floats",
                "0: a micro-batch over NCCL carries at least one row",
            ));
        }
        let mut h = dev(self.model.kernels().zeros::<f32>(floats))?;
        dev(link.recv(&mut h))?;
        Ok(h)
    }

    /// Receives one relayed segment's positions, then its counts, over `link`.
    fn receive_relay(&self, shape: RelayShape, link: &PeerLink) -> Result<(CudaSlice<u32>, CudaSlice<i32>)> {
        // The sender never sends an empty relay, so nothing was sent for one announced empty
        // (it fails the batch's checks).
        let positions = shape.positions().filter(|&n| n > 0).ok_or_else(|| {
            WorkerError::invalid(
                "nccl.relays",
                format!(
                    "{} rows × ld {}: a relay over NCCL has 1 or more rows of 1 or more slots",
                    shape.rows, shape.ld
                ),
            )
        })?;
        let k = self.model.kernels();
        // The counts are received even when the positions failed (as in `receive_all`).
        let sel = dev(k.zeros::<u32>(positions)).and_then(|mut sel| dev(link.recv(&mut sel)).map(|_| sel));
        let lens = dev(k.zeros::<i32>(shape.rows)).and_then(|mut lens| dev(link.recv(&mut lens)).map(|_| lens));
        Ok((sel?, lens?))
    }

    /// Receives everything `announced` over `link`, in the order it was sent: the hidden
    /// states, then each relay. Every receive is tried even after one failed, so the sends
    /// stay matched; the first error is returned.
    fn receive_all(&self, announced: &PeerInput, link: &PeerLink) -> Result<(CudaSlice<f32>, Vec<ReceivedRelay>)> {
        let hidden = self.receive(announced.hidden_floats, link);
        let relays: Vec<_> = announced
            .relays
            .iter()
            .map(|&(segment, shape)| {
                let (sel, lens) = self.receive_relay(shape, link)?;
                Ok(ReceivedRelay {
                    segment,
                    sel,
                    lens,
                    ld: shape.ld,
                })
            })
            .collect();
        Ok((hidden?, relays.into_iter().collect::<Result<_>>()?))
    }

    /// Checks a received relay's values on the device before the attention kernels index the
    /// KV cache with them: row r of a segment starting at `start` sits at position `start + r`,
    /// so it must use 1..=ld slots, each selecting a position at most `start + r`. A bad relay
    /// (a faulty or hostile peer) is invalid input naming its first bad row.
    fn check_relay(&self, relay: &ReceivedRelay, start: usize) -> Result<()> {
        let k = self.model.kernels();
        let ld = relay.ld;
        let Some(row) = dev(k.validate_topk_rows(&relay.sel.slice(..), &relay.lens.slice(..), ld, start))? else {
            return Ok(());
        };
        let pos = start + row;
        // The counts are small enough to bring back and name the fault; the positions are not.
        let what = match dev(k.download(&relay.lens))?.get(row) {
            Some(&n) if n >= 1 && n as usize <= ld => format!("a selected position exceeds the row's position {pos}"),
            Some(&n) => format!("count {n} is outside 1..={ld}"),
            None => format!("the row is past the {} received counts", relay.lens.len()),
        };
        Err(WorkerError::invalid(
            "nccl.relays",
            format!("segment {} row {row} (position {pos}): {what}", relay.segment),
        ))
    }

    /// Sends `hidden`, then each segment's relay in segment order, to the next stage over
    /// `link`; returns what was sent (the next stage's announcement).
    fn send_all(&self, hidden: CudaSlice<f32>, relay: Vec<Option<DevTopk>>, link: &PeerLink) -> Result<PeerInput> {
        let mut sent = PeerInput {
            hidden_floats: hidden.len(),
            relays: Vec::new(),
        };
        dev(link.send(hidden))?;
        for (i, t) in relay.into_iter().enumerate() {
            if let Some(t) = t {
                let (sel, lens, ld) = t.into_parts();
                sent.relays.push((i, RelayShape { rows: lens.len(), ld }));
                dev(link.send_u32(sel))?;
                dev(link.send_i32(lens))?;
            }
        }
        Ok(sent)
    }
}

impl StageCompute for GpuStage {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn pattern(&self) -> &IndexPattern {
        self.model.pattern()
    }

    fn range(&self) -> LayerRange {
        self.model.range()
    }

    fn is_last(&self) -> bool {
        self.model.is_last()
    }

    fn device(&self) -> StageDevice {
        StageDevice::Cuda(self.opts.ordinal)
    }

    fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>> {
        self.model.prepare_pattern(pattern)
    }

    fn forward(
        &self,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: BatchInput<'_>,
        sink: BatchSink<'_, '_>,
    ) -> Result<BatchOutput> {
        // Hidden states and relays over NCCL are received first, whatever happens next.
        let received = match input {
            BatchInput::Host(i) => Err(i),
            BatchInput::Peer { announced, link } => Ok(self.receive_all(announced, link)?),
        };
        let out = {
            let mut guard = self.cache();
            let cache = guard.as_mut().ok_or_else(|| {
                WorkerError::Device("this stage has no KV cache (a failed Reconfigure left it without one)".into())
            })?;
            match received {
                Err(host) => self.model.forward_host(cache, segments, patterns, host)?,
                Ok((hidden, parts)) => {
                    // The relays' shapes were checked against the batch (`PeerInput::check_relays`);
                    // their values are checked here, after every announced buffer was received.
                    let mut relays: Vec<Option<DevTopk>> = segments.iter().map(|_| None).collect();
                    for r in parts {
                        let i = r.segment;
                        let slot = relays.get_mut(i).ok_or_else(|| {
                            WorkerError::invalid(
                                "nccl.relays.segment",
                                format!("{i}: the batch has {} segments", segments.len()),
                            )
                        })?;
                        self.check_relay(&r, segments[i].start)?;
                        *slot = Some(DevTopk::received(r.sel, r.lens, r.ld, segments[i].start));
                    }
                    self.model.forward_received(cache, segments, patterns, hidden, relays)?
                }
            }
        };
        match sink {
            BatchSink::Logits(l) => {
                self.model
                    .for_each_logits_row(&out.hidden.slice(..), l.rows, l.chunk, l.visit)?;
                Ok(BatchOutput {
                    relay: self.model.relay_to_host(out)?.relay,
                    ..BatchOutput::default()
                })
            }
            BatchSink::Host => {
                let out = self.model.relay_to_host(out)?;
                Ok(BatchOutput {
                    hidden: self.model.download(&out.hidden)?,
                    relay: out.relay,
                    sent: PeerInput::default(),
                })
            }
            BatchSink::Peer(link) => {
                let relay = segments.iter().map(|_| None).collect();
                let sent = self.send_all(out.hidden, out.relay, link)?;
                Ok(BatchOutput {
                    hidden: Vec::new(),
                    relay,
                    sent,
                })
            }
        }
    }

    fn nccl_unique_id(&self) -> Result<Vec<u8>> {
        dev(kernels::cuda::nccl_unique_id()).map(|id| id.to_vec())
    }

    fn join_peer(&self, unique_id: &[u8], rank: usize) -> Result<PeerLink> {
        dev(PeerLink::join(self.model.kernels(), unique_id, rank))
    }

    fn discard_peer_input(&self, announced: &PeerInput, link: &PeerLink) -> Result<()> {
        self.receive_all(announced, link).map(drop)
    }

    fn release(&self, seqs: &[u64]) {
        if let Some(cache) = self.cache().as_mut() {
            for s in seqs {
                cache.release(*s);
            }
        }
    }

    fn cache_stats(&self) -> CacheStats {
        match self.cache().as_ref() {
            Some(c) => CacheStats {
                block_size: c.block_size(),
                capacity_blocks: c.capacity_blocks(),
                free_blocks: c.free_blocks(),
                used_blocks: c.used_blocks(),
                sequences: c.sequences(),
            },
            None => CacheStats {
                block_size: self.opts.block_size,
                ..CacheStats::default()
            },
        }
    }

    fn load_range(&self, dir: &Path, range: LayerRange, pattern: &str) -> Result<Box<dyn StageCompute>> {
        let stage = Self::load_weights(dir, self.config().clone(), Some(pattern), range, self.opts)?;
        Ok(Box::new(stage))
    }

    fn free_cache(&self) {
        *self.cache() = None;
    }

    fn allocate_cache(&self) -> Result<()> {
        let mut guard = self.cache();
        if guard.is_none() {
            let blocks = cache_blocks_for(&self.model, &self.opts)?;
            *guard = Some(self.model.new_cache(self.opts.block_size, blocks)?);
        }
        Ok(())
    }
}
