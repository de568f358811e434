//! Dataset Decomposition (Pouransari et al., NeurIPS'24) and a length
//! curriculum, an option of the data pipeline.
//!
//! Each document (tokenised) is cut into chunks whose lengths are the powers of
//! two of its length's binary form, longest first (1000 tokens with a
//! 256-token floor: 512 + 256, the last 232 tokens too short for a bucket are
//! dropped), and each chunk goes into the bucket of its length. A step draws
//! its whole batch from one bucket, `tokens_per_step / length` sequences, so
//! every step has the same number of tokens and no padding. Which bucket comes
//! next follows a curriculum: cycles that go from the shortest bucket to the
//! longest, each bucket visited in proportion to the tokens it holds; within a
//! bucket, sequences come in a seeded order. Everything depends on the seed and
//! the corpus only, never on the world size, and a [`DecompositionCursor`]
//! resumes exactly.

use std::collections::BTreeMap;

use weft_planner::rng::SplitMix64;

use crate::data::{
    Batch, BatchCursor, BatchStream, Corpus, DataError, Sample, Tokenizer, epoch_order,
};

/// One chunk of a document: tokens `[start, start + length)` of document `document`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub document: usize,
    pub start: usize,
}

/// The buckets of a decomposed corpus, by chunk length.
#[derive(Clone, Debug)]
pub struct Decomposition {
    /// Chunks of each bucket length, in corpus order.
    pub buckets: BTreeMap<usize, Vec<Chunk>>,
    tokens: Vec<Vec<u32>>,
}

/// Where a decomposed stream stands; saved with each checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DecompositionCursor {
    pub step: u64,
    /// Sequences already drawn from each bucket, by bucket index (shortest first).
    pub drawn: [u64; 32],
}

/// Lengths of the chunks of an `n`-token document: powers of two of `n`'s
/// binary form, at least `min` and at most `max`, longest first. Parts above
/// `max` become several `max` chunks.
pub fn chunk_lengths(n: usize, min: usize, max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = n;
    while rest >= max {
        out.push(max);
        rest -= max;
    }
    let mut bit = max / 2;
    while bit >= min.max(1) {
        if rest >= bit {
            out.push(bit);
            rest -= bit;
        }
        bit /= 2;
    }
    out
}

impl Decomposition {
    /// Decomposes `corpus` into buckets of powers of two from `min_length` to
    /// `max_length` tokens (both powers of two).
    pub fn new(
        corpus: &Corpus,
        tokenizer: &Tokenizer,
        min_length: usize,
        max_length: usize,
    ) -> Result<Decomposition, DataError> {
        let bad = |m: String| Err(DataError::Decomposition(m));
        for (field, value) in [
            ("min bucket length", min_length),
            ("max bucket length", max_length),
        ] {
            if !value.is_power_of_two() {
                return bad(format!("{field} {value} is not a power of two"));
            }
        }
        if min_length > max_length {
            return bad(format!(
                "min bucket length {min_length} is above the max {max_length}"
            ));
        }
        if max_length / min_length >= 1 << 31 {
            return bad(format!(
                "{min_length}..{max_length} makes more than 32 buckets"
            ));
        }
        let tokens: Vec<Vec<u32>> = corpus
            .documents
            .iter()
            .map(|d| tokenizer.encode(&d.source, &d.text))
            .collect::<Result<_, _>>()?;
        let mut buckets: BTreeMap<usize, Vec<Chunk>> = BTreeMap::new();
        for (document, t) in tokens.iter().enumerate() {
            let mut start = 0;
            for length in chunk_lengths(t.len(), min_length, max_length) {
                buckets
                    .entry(length)
                    .or_default()
                    .push(Chunk { document, start });
                start += length;
            }
        }
        if buckets.is_empty() {
            return bad(format!(
                "no document has {min_length} tokens or more (the min bucket length)"
            ));
        }
        Ok(Decomposition { buckets, tokens })
    }

    /// The bucket lengths, shortest first.
    pub fn lengths(&self) -> Vec<usize> {
        self.buckets.keys().copied().collect()
    }

    /// One curriculum cycle: bucket indices (shortest first) from short to long,
    /// each as many times as its share of the tokens in `cycle_steps` steps
    /// (at least once).
    pub fn cycle(&self, cycle_steps: usize) -> Vec<usize> {
        let tokens: Vec<f64> = self
            .buckets
            .iter()
            .map(|(len, chunks)| (*len * chunks.len()) as f64)
            .collect();
        let total: f64 = tokens.iter().sum();
        tokens
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                let visits = ((t / total) * cycle_steps as f64).round().max(1.0) as usize;
                std::iter::repeat_n(i, visits)
            })
            .collect()
    }

    /// The batch of step `cursor.step`, and the cursor after it.
    pub fn batch(
        &self,
        seed: u64,
        tokens_per_step: usize,
        cycle_steps: usize,
        cursor: DecompositionCursor,
    ) -> (Batch, DecompositionCursor) {
        let cycle = self.cycle(cycle_steps.max(1));
        let bucket = cycle[(cursor.step % cycle.len() as u64) as usize];
        let (&length, chunks) = self
            .buckets
            .iter()
            .nth(bucket)
            .map(|(l, c)| (l, c.as_slice()))
            .unwrap_or((&0, &[]));
        let count = (tokens_per_step / length.max(1)).max(1) as u64;
        let mut next = cursor;
        let mut samples = Vec::new();
        let n = chunks.len() as u64;
        // Each bucket has its own seeded order per epoch, computed once per epoch.
        let bucket_seed =
            SplitMix64::new(seed ^ (bucket as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        let mut order: Option<(u64, Vec<usize>)> = None;
        for _ in 0..count {
            let index = next.drawn[bucket];
            let (epoch, position) = (index / n, (index % n) as usize);
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, epoch_order(chunks.len(), bucket_seed, epoch)));
            }
            let Some((_, current)) = &order else { break };
            let chunk = chunks[current[position]];
            samples.push(Sample {
                index,
                document: chunk.document,
                tokens: self.tokens[chunk.document][chunk.start..chunk.start + length].to_vec(),
            });
            next.drawn[bucket] += 1;
        }
        next.step += 1;
        (Batch { samples }, next)
    }
}

/// How a run draws its global batches from the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "order", rename_all = "lowercase")]
pub enum DataOrder {
    /// Whole documents (cut at the max sequence length) in a seeded order,
    /// as many as fit the step's tokens ([`crate::data::BatchStream`]).
    Documents,
    /// Dataset Decomposition: power-of-two chunks from `min_length` tokens to
    /// the max sequence length, each step from one bucket, buckets visited
    /// short to long in curriculum cycles of `cycle_steps` steps.
    Decomposed {
        min_length: usize,
        cycle_steps: usize,
    },
}

/// The global batches of a run, in either order; both depend on the seed and
/// the corpus only, and resume exactly from their cursor.
#[derive(Debug)]
pub enum Sampler<'a> {
    Documents(BatchStream<'a>),
    Decomposed(Box<DecomposedStream>),
}

/// A decomposed corpus and where its stream stands.
#[derive(Debug)]
pub struct DecomposedStream {
    buckets: Decomposition,
    seed: u64,
    tokens_per_step: usize,
    cycle_steps: usize,
    cursor: DecompositionCursor,
}

impl<'a> Sampler<'a> {
    /// The sampler of `order` over `corpus` read by `tokenizer`, resuming
    /// at `resume_at`: the next sample (whole documents) or the cursor
    /// (decomposed).
    pub fn new(
        (corpus, tokenizer): (&'a Corpus, &'a Tokenizer),
        order: DataOrder,
        seed: u64,
        tokens_per_step: usize,
        max_seq_len: usize,
        (next_sample, cursor): (u64, DecompositionCursor),
    ) -> Result<Sampler<'a>, DataError> {
        let stream = BatchStream::new(
            corpus,
            tokenizer,
            seed,
            tokens_per_step,
            max_seq_len,
            BatchCursor { next_sample },
        )?;
        let DataOrder::Decomposed {
            min_length,
            cycle_steps,
        } = order
        else {
            return Ok(Sampler::Documents(stream));
        };
        let bad = |m: String| Err(DataError::Decomposition(m));
        if !max_seq_len.is_power_of_two() {
            return bad(format!(
                "the max sequence length {max_seq_len} is the longest bucket and must be a power of two"
            ));
        }
        if max_seq_len > tokens_per_step {
            return bad(format!(
                "a step of {tokens_per_step} tokens cannot hold one sequence of the longest bucket ({max_seq_len} tokens)"
            ));
        }
        if cycle_steps == 0 {
            return bad("a curriculum cycle must have at least one step".to_string());
        }
        Ok(Sampler::Decomposed(Box::new(DecomposedStream {
            buckets: Decomposition::new(corpus, tokenizer, min_length, max_seq_len)?,
            seed,
            tokens_per_step,
            cycle_steps,
            cursor,
        })))
    }

    /// The next global batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        match self {
            Sampler::Documents(stream) => stream.next_batch(),
            Sampler::Decomposed(stream) => {
                let (batch, next) = stream.buckets.batch(
                    stream.seed,
                    stream.tokens_per_step,
                    stream.cycle_steps,
                    stream.cursor,
                );
                stream.cursor = next;
                Ok(batch)
            }
        }
    }

    /// The next whole document's place in the order (0 when decomposed).
    pub fn next_sample(&self) -> u64 {
        match self {
            Sampler::Documents(stream) => stream.cursor().next_sample,
            Sampler::Decomposed(_) => 0,
        }
    }

    /// Where a decomposed stream stands (None for whole documents).
    pub fn bucket_cursor(&self) -> Option<DecompositionCursor> {
        match self {
            Sampler::Documents(_) => None,
            Sampler::Decomposed(stream) => Some(stream.cursor),
        }
    }
}

/// A batch drawn ahead of training, with where the data order stands after
/// it (for the checkpoint of its step) and what drawing it took.
#[derive(Debug)]
pub struct Drawn {
    pub batch: Batch,
    /// [`Sampler::next_sample`] after this batch.
    pub next_sample: u64,
    /// [`Sampler::bucket_cursor`] after this batch.
    pub buckets: Option<DecompositionCursor>,
    /// Seconds the data thread took to draw it (tokenizing its documents).
    pub draw_s: f64,
}

/// The batches of a run, drawn (documents read in order and tokenized) on
/// a thread of its own, [`BATCHES_AHEAD`] ahead of the steps that train on
/// them: tokenizing leaves the critical path wherever the thread keeps up
/// (each step reports the wait and the thread's speed). The order is the
/// sampler's, exactly: the thread only runs ahead of it.
#[derive(Debug)]
pub struct DataAhead {
    batches: std::sync::mpsc::Receiver<Result<Drawn, DataError>>,
    /// The thread, joined to say why it stopped early (a panic).
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How many batches the data thread holds ready.
pub const BATCHES_AHEAD: usize = 2;

/// What a [`Sampler`] is made from, owned, for the data thread.
#[derive(Clone, Debug)]
pub struct SamplerSettings {
    pub order: DataOrder,
    pub seed: u64,
    pub tokens_per_step: usize,
    pub max_seq_len: usize,
    /// Where the order resumes: the next sample, or the bucket cursor.
    pub resume_at: (u64, DecompositionCursor),
    /// Batches to draw in all.
    pub batches: u64,
}

impl DataAhead {
    /// Starts drawing `settings.batches` batches of `corpus` read by
    /// `tokenizer`. A sampler that cannot be made, or a batch that cannot be
    /// drawn, comes back as the next batch's error.
    pub fn start(
        corpus: std::sync::Arc<Corpus>,
        tokenizer: Tokenizer,
        settings: SamplerSettings,
    ) -> Result<DataAhead, DataError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(BATCHES_AHEAD);
        if settings.batches == 0 {
            // Nothing to draw (a run resumed at its last step).
            return Ok(DataAhead {
                batches: rx,
                thread: None,
            });
        }
        let thread = std::thread::Builder::new()
            .name("weft-data".to_string())
            .spawn(move || {
                let sampler = Sampler::new(
                    (&corpus, &tokenizer),
                    settings.order,
                    settings.seed,
                    settings.tokens_per_step,
                    settings.max_seq_len,
                    settings.resume_at,
                );
                let mut sampler = match sampler {
                    Ok(sampler) => sampler,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for _ in 0..settings.batches {
                    let started = std::time::Instant::now();
                    let drawn = sampler.next_batch().map(|batch| Drawn {
                        batch,
                        next_sample: sampler.next_sample(),
                        buckets: sampler.bucket_cursor(),
                        draw_s: started.elapsed().as_secs_f64(),
                    });
                    let failed = drawn.is_err();
                    // A run that stopped (a new mesh epoch, an error) no
                    // longer receives: the thread ends with it.
                    if tx.send(drawn).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Thread(e.to_string()))?;
        Ok(DataAhead {
            batches: rx,
            thread: Some(thread),
        })
    }

    /// The next batch, waiting for the thread if it is not drawn yet.
    pub fn next_drawn(&mut self) -> Result<Drawn, DataError> {
        match self.batches.recv() {
            Ok(drawn) => drawn,
            Err(_) => {
                let why = match self.thread.take().map(std::thread::JoinHandle::join) {
                    Some(Err(panic)) => {
                        let said = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        format!("the data thread panicked: {said}")
                    }
                    _ => "the data thread stopped before its last batch".to_string(),
                };
                Err(DataError::Thread(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Document;

    /// The data thread draws exactly the sampler's batches, with its
    /// cursors, in both orders, and ends after the count it was given.
    #[test]
    fn the_data_thread_draws_the_samplers_batches_in_order() {
        let corpus = corpus(&[300, 40, 1000, 77, 512, 9, 260, 2048, 130]);
        let orders = [
            DataOrder::Documents,
            DataOrder::Decomposed {
                min_length: 64,
                cycle_steps: 3,
            },
        ];
        for order in orders {
            let resume_at = (2, DecompositionCursor::default());
            let mut sampler = Sampler::new(
                (&corpus, &Tokenizer::Bytes),
                order,
                7,
                1024,
                1024,
                resume_at,
            )
            .unwrap();
            let settings = SamplerSettings {
                order,
                seed: 7,
                tokens_per_step: 1024,
                max_seq_len: 1024,
                resume_at,
                batches: 5,
            };
            let mut ahead = DataAhead::start(
                std::sync::Arc::new(corpus.clone()),
                Tokenizer::Bytes,
                settings,
            )
            .unwrap();
            for _ in 0..5 {
                let drawn = ahead.next_drawn().unwrap();
                assert_eq!(drawn.batch, sampler.next_batch().unwrap());
                assert_eq!(drawn.next_sample, sampler.next_sample());
                assert_eq!(drawn.buckets, sampler.bucket_cursor());
            }
            let err = ahead.next_drawn().unwrap_err().to_string();
            assert!(err.contains("stopped before its last batch"), "{err}");
        }
        // A sampler that cannot be made says why at the first batch.
        let settings = SamplerSettings {
            order: DataOrder::Decomposed {
                min_length: 64,
                cycle_steps: 3,
            },
            seed: 7,
            tokens_per_step: 1024,
            max_seq_len: 1000,
            resume_at: (0, DecompositionCursor::default()),
            batches: 5,
        };
        let mut ahead =
            DataAhead::start(std::sync::Arc::new(corpus), Tokenizer::Bytes, settings).unwrap();
        let err = ahead.next_drawn().unwrap_err().to_string();
        assert!(err.contains("must be a power of two"), "{err}");
    }

    fn corpus(lengths: &[usize]) -> Corpus {
        Corpus {
            documents: lengths
                .iter()
                .enumerate()
                .map(|(i, n)| Document {
                    source: format!("doc{i}"),
                    // tokenize adds one end-of-document token.
                    text: "x".repeat(n.saturating_sub(1)),
                })
                .collect(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn documents_split_into_their_powers_of_two() {
        assert_eq!(chunk_lengths(1000, 256, 4096), vec![512, 256]);
        assert_eq!(chunk_lengths(1000, 8, 4096), vec![512, 256, 128, 64, 32, 8]);
        // 10,000 = 2·4096 + 1024 + 512 + 256 + 16.
        assert_eq!(
            chunk_lengths(10_000, 256, 4096),
            vec![4096, 4096, 1024, 512, 256]
        );
        assert_eq!(chunk_lengths(100, 256, 4096), Vec::<usize>::new());
    }

    #[test]
    fn every_step_has_the_same_tokens_from_one_bucket_and_resumes_exactly() {
        let c = corpus(&[1000, 5000, 300, 2048, 700, 9000, 260, 4100, 1100]);
        let dd = Decomposition::new(&c, &Tokenizer::Bytes, 256, 2048).unwrap();
        assert_eq!(dd.lengths(), vec![256, 512, 1024, 2048]);
        let mut cursor = DecompositionCursor::default();
        let mut batches = Vec::new();
        for _ in 0..20 {
            let (batch, next) = dd.batch(5, 4096, 8, cursor);
            let length = batch.samples[0].tokens.len();
            assert!(batch.samples.iter().all(|s| s.tokens.len() == length));
            assert_eq!(batch.tokens(), 4096);
            batches.push(batch);
            cursor = next;
        }
        // The curriculum goes from short to long within a cycle.
        let cycle = dd.cycle(8);
        assert!(cycle.windows(2).all(|w| w[0] <= w[1]));
        // Resuming from a saved cursor replays the same batches.
        let mut resumed = DecompositionCursor::default();
        for _ in 0..7 {
            resumed = dd.batch(5, 4096, 8, resumed).1;
        }
        for expected in &batches[7..] {
            let (batch, next) = dd.batch(5, 4096, 8, resumed);
            assert_eq!(&batch, expected);
            resumed = next;
        }
    }

    #[test]
    fn bad_bucket_bounds_are_refused() {
        let c = corpus(&[1000]);
        let message = |r: Result<Decomposition, DataError>| r.unwrap_err().to_string();
        assert!(
            message(Decomposition::new(&c, &Tokenizer::Bytes, 300, 2048))
                .contains("300 is not a power of two")
        );
        assert!(
            message(Decomposition::new(&c, &Tokenizer::Bytes, 4096, 2048))
                .contains("above the max 2048")
        );
        let short = corpus(&[100]);
        assert!(
            message(Decomposition::new(&short, &Tokenizer::Bytes, 256, 2048))
                .contains("no document has 256 tokens")
        );
    }
}
