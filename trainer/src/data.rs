//! The data pipeline: a corpus of text documents, a byte-level tokenizer, and the
//! global order in which samples are drawn.
//!
//! Guarantees:
//! - The order of samples depends only on the seed and the corpus, never on the
//!   world size: batches are drawn globally, and the step plan (not the data
//!   pipeline) decides which rank holds which tokens. A resized job that resumes
//!   from a [`BatchCursor`] sees exactly the batches it would have seen.
//! - Documents stay whole up to the maximum sequence length; longer ones are cut.
//! - Every bad input (missing directory, unreadable file, bad JSONL line, no
//!   documents at all) is a [`DataError`] naming the file and line.
//!
//! Tokenizer: bytes. Token `b` is byte `b` (0..=255) and [`END_OF_DOCUMENT`] (256)
//! closes every document. It needs no vocabulary file or download, round-trips any
//! UTF-8 exactly, and makes sequences about four times longer than a BPE
//! vocabulary would: for a long-context trainer, that is a useful stress.

use std::path::{Path, PathBuf};

use weft_planner::rng::SplitMix64;

/// Token that closes every document.
pub const END_OF_DOCUMENT: u32 = 256;
/// Number of distinct tokens of the byte tokenizer.
pub const BYTE_VOCAB_SIZE: u32 = 257;

/// What is wrong with the data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("corpus directory {0} does not exist")]
    NotFound(PathBuf),
    #[error("corpus path {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not UTF-8 text")]
    NotUtf8 { path: PathBuf },
    #[error("{path}:{line}: not a JSON object with a string field {field:?}: {reason}")]
    BadJsonLine {
        path: PathBuf,
        line: usize,
        field: String,
        reason: String,
    },
    #[error("corpus directory {dir} holds no documents (looked for {looked_for})")]
    Empty {
        dir: PathBuf,
        looked_for: &'static str,
    },
    #[error("{path}: {reason}")]
    BadParquet { path: PathBuf, reason: String },
    #[error("{path}:{row}: the column {field:?} holds no string ({found})")]
    BadParquetRow {
        path: PathBuf,
        row: usize,
        field: String,
        found: String,
    },
    #[error("the data thread: {0}")]
    Thread(String),
    #[error("{field} must be at least 1, got {value}")]
    BadSize { field: &'static str, value: usize },
    #[error("dataset decomposition: {0}")]
    Decomposition(String),
    #[error("{path}: not a tokenizer weft can read: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{source_name}: the tokenizer failed: {message}")]
    Tokenize {
        source_name: String,
        message: String,
    },
}

impl DataError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            DataError::NotFound(_) | DataError::NotADirectory(_) | DataError::Empty { .. } => {
                "corpus_missing"
            }
            DataError::Io { .. } => "corpus_io",
            DataError::NotUtf8 { .. }
            | DataError::BadJsonLine { .. }
            | DataError::BadParquet { .. }
            | DataError::BadParquetRow { .. } => "corpus_format",
            DataError::BadSize { .. } | DataError::Decomposition(_) => "data_config",
            DataError::Tokenizer { .. } | DataError::Tokenize { .. } => "tokenizer",
            DataError::Thread(_) => "data_thread",
        }
    }
}

/// One document of the corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Where it came from: `path` or `path:line`.
    pub source: String,
    pub text: String,
}

/// All documents of a corpus, in a fixed order (sorted paths, then line order).
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    pub documents: Vec<Document>,
    /// Entries of the corpus directory that are not regular files (a FIFO,
    /// a socket, a device, a broken link), left unread: reading a FIFO would
    /// wait for ever. With what each is.
    pub skipped: Vec<(PathBuf, &'static str)>,
}

/// The data source that names the corpus built into this binary (the one in
/// `trainer/corpus`), so a worker image needs no data volume to train.
pub const BUILTIN_CORPUS: &str = "builtin:python-reference";

const BUILTIN_CORPUS_TEXT: &str = include_str!("../corpus/python-reference.jsonl");

/// The field of a JSONL line that holds its document, unless the run names
/// another (`--text-field`).
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// How the files of a corpus directory are read: the job's `data.format`
/// (`auto`, by extension; or only `text`, `jsonl` or `parquet` files), a
/// run's `--data-format` by [`DataFormat::name`].
pub use weft_crds::DataFormat;

/// How a file of a corpus read in `format` is read, by its extension;
/// `None`: not read.
fn reader_of(format: DataFormat, path: &Path) -> Option<DataFormat> {
    let by_extension = match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "txt" | "md" => DataFormat::Text,
        "jsonl" => DataFormat::JsonLines,
        "parquet" => DataFormat::Parquet,
        _ => return None,
    };
    (format == DataFormat::Auto || format == by_extension).then_some(by_extension)
}

/// What a corpus read in `format` is looked for in, for an error.
fn looked_for(format: DataFormat) -> &'static str {
    match format {
        DataFormat::Auto => "non-empty .txt, .md, .jsonl and .parquet files",
        DataFormat::Text => "non-empty .txt and .md files (data format text)",
        DataFormat::JsonLines => "non-empty .jsonl files (data format jsonl)",
        DataFormat::Parquet => ".parquet files with rows (data format parquet)",
    }
}

impl Corpus {
    /// Loads every `.txt` and `.md` file (one document each), every `.jsonl`
    /// file (one document per non-empty line, from its `text` field) and
    /// every `.parquet` file (one document per row, from its `text` column)
    /// under `dir`; or, when `dir` is [`BUILTIN_CORPUS`], the corpus built
    /// into the binary.
    pub fn load(dir: &Path) -> Result<Corpus, DataError> {
        Corpus::load_with(dir, DataFormat::Auto, DEFAULT_TEXT_FIELD)
    }

    /// [`Corpus::load`], reading only the files of `format` and each JSONL
    /// line's or Parquet row's `text_field` (the built-in corpus keeps its
    /// own `text`).
    pub fn load_with(
        dir: &Path,
        format: DataFormat,
        text_field: &str,
    ) -> Result<Corpus, DataError> {
        if dir.to_str() == Some(BUILTIN_CORPUS) {
            let mut documents = Vec::new();
            push_jsonl(
                Path::new(BUILTIN_CORPUS),
                BUILTIN_CORPUS_TEXT,
                DEFAULT_TEXT_FIELD,
                &mut documents,
            )?;
            return Ok(Corpus {
                documents,
                skipped: Vec::new(),
            });
        }
        directory(dir)?;
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        collect_files(dir, &mut files, &mut skipped)?;
        files.sort();
        skipped.sort();
        let mut documents = Vec::new();
        for path in files {
            let Some(reader) = reader_of(format, &path) else {
                continue;
            };
            if reader == DataFormat::Parquet {
                push_parquet(&path, text_field, &mut documents)?;
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            let text =
                String::from_utf8(bytes).map_err(|_| DataError::NotUtf8 { path: path.clone() })?;
            if reader == DataFormat::JsonLines {
                push_jsonl(&path, &text, text_field, &mut documents)?;
            } else if !text.trim().is_empty() {
                documents.push(Document {
                    source: path.display().to_string(),
                    text,
                });
            }
        }
        if documents.is_empty() {
            return Err(DataError::Empty {
                dir: dir.to_path_buf(),
                looked_for: looked_for(format),
            });
        }
        Ok(Corpus { documents, skipped })
    }

    /// What can be checked of a corpus without reading it all, as a pod's
    /// worker checks its job's data before any rank starts: the directory,
    /// that it holds files of `format`, that each JSON-lines file's first
    /// document line has a string `text_field`, and each Parquet file a
    /// string column of that name. Every line and row is read by the ranks.
    pub fn check(dir: &Path, format: DataFormat, text_field: &str) -> Result<(), DataError> {
        use std::io::BufRead;
        if dir.to_str() == Some(BUILTIN_CORPUS) {
            return Ok(());
        }
        directory(dir)?;
        let (mut files, mut skipped) = (Vec::new(), Vec::new());
        collect_files(dir, &mut files, &mut skipped)?;
        files.sort();
        let mut found = false;
        for path in files {
            let Some(reader) = reader_of(format, &path) else {
                continue;
            };
            found = true;
            match reader {
                DataFormat::Parquet => {
                    parquet_text_column(&path, text_field)?;
                }
                DataFormat::JsonLines => {
                    let io = |source| DataError::Io {
                        path: path.clone(),
                        source,
                    };
                    let file = std::io::BufReader::new(std::fs::File::open(&path).map_err(io)?);
                    for (index, line) in file.lines().enumerate() {
                        let line = line.map_err(|e| match e.kind() {
                            std::io::ErrorKind::InvalidData => {
                                DataError::NotUtf8 { path: path.clone() }
                            }
                            _ => DataError::Io {
                                path: path.clone(),
                                source: e,
                            },
                        })?;
                        if line.trim().is_empty() {
                            continue;
                        }
                        let mut first = Vec::new();
                        push_jsonl(&path, &line, text_field, &mut first).map_err(|e| match e {
                            DataError::BadJsonLine {
                                field,
                                reason,
                                path,
                                ..
                            } => DataError::BadJsonLine {
                                path,
                                line: index + 1,
                                field,
                                reason,
                            },
                            other => other,
                        })?;
                        break;
                    }
                }
                _ => {}
            }
        }
        if !found {
            return Err(DataError::Empty {
                dir: dir.to_path_buf(),
                looked_for: looked_for(format),
            });
        }
        Ok(())
    }

    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for document in &self.documents {
            // Length-prefixed, so documents cannot run into each other.
            hasher.update((document.text.len() as u64).to_le_bytes());
            hasher.update(document.text.as_bytes());
        }
        crate::checkpoint::hex(&hasher.finalize())
    }

    /// The skipped entries, for people: `path (what it is)`, comma-separated.
    pub fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        Some(
            self.skipped
                .iter()
                .map(|(path, what)| format!("{} ({what})", path.display()))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }
}

/// The documents of a JSONL text (one per non-empty line, its `text` field).
fn push_jsonl(
    path: &Path,
    text: &str,
    field: &str,
    documents: &mut Vec<Document>,
) -> Result<(), DataError> {
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::BadJsonLine {
            path: path.to_path_buf(),
            line: index + 1,
            field: field.to_string(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let text = value
            .get(field)
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad(format!("no string field {field:?}")))?;
        if !text.is_empty() {
            documents.push(Document {
                source: format!("{}:{}", path.display(), index + 1),
                text: text.to_string(),
            });
        }
    }
    Ok(())
}

/// That `dir` is a directory, or why not: not there, not a directory, or
/// unreadable (an I/O error, kept as the cause).
fn directory(dir: &Path) -> Result<(), DataError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DataError::NotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DataError::NotFound(dir.to_path_buf()))
        }
        Err(source) => Err(DataError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// A Parquet file's reader (its footer read) and its top-level string
/// column `field`, or why it has none.
fn parquet_text_column(
    path: &Path,
    field: &str,
) -> Result<
    (
        parquet::file::serialized_reader::SerializedFileReader<std::fs::File>,
        parquet::schema::types::TypePtr,
    ),
    DataError,
> {
    use parquet::basic::Type as PhysicalType;
    use parquet::file::reader::FileReader;
    let bad = |reason: String| DataError::BadParquet {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader =
        parquet::file::serialized_reader::SerializedFileReader::new(file).map_err(|e| match e {
            // A read that failed is no fault of the file's.
            parquet::errors::ParquetError::External(source) if source.is::<std::io::Error>() => {
                DataError::Io {
                    path: path.to_path_buf(),
                    source: match source.downcast::<std::io::Error>() {
                        Ok(io) => *io,
                        Err(other) => std::io::Error::other(other.to_string()),
                    },
                }
            }
            e => bad(format!(
                "not a Parquet file weft can read: {}",
                cut(&e.to_string())
            )),
        })?;
    let columns = reader.metadata().file_metadata().schema().get_fields();
    let Some(column) = columns.iter().find(|c| c.name() == field).cloned() else {
        let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
        return Err(bad(format!(
            "no column {field:?} (the text field); its columns are {names:?}"
        )));
    };
    if !column.is_primitive() || column.get_physical_type() != PhysicalType::BYTE_ARRAY {
        return Err(bad(format!(
            "the column {field:?} (the text field) does not hold strings"
        )));
    }
    Ok((reader, column))
}

/// `text` cut to 300 bytes (at a character), for an error that may quote
/// a whole document.
fn cut(text: &str) -> String {
    if text.len() <= 300 {
        return text.to_string();
    }
    format!("{}...", crate::prefix_within(text, 300))
}

/// The documents of a Parquet file: one per row with a non-empty string in
/// its top-level column `field` (a row's source is `path:row`, from 1). The
/// column is read alone; a null or a value that is not a string is refused
/// by row, as a JSONL line without its field is.
fn push_parquet(path: &Path, field: &str, documents: &mut Vec<Document>) -> Result<(), DataError> {
    use parquet::file::reader::FileReader;
    use parquet::record::Field;
    let bad = |reason: String| DataError::BadParquet {
        path: path.to_path_buf(),
        reason,
    };
    let (reader, column) = parquet_text_column(path, field)?;
    let root = reader.metadata().file_metadata().schema();
    let projection = parquet::schema::types::Type::group_type_builder(root.name())
        .with_fields(vec![column.clone()])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| bad(e.to_string()))?;
    for (index, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {}: {}", index + 1, cut(&e.to_string()))))?;
        let refused = |found: String| DataError::BadParquetRow {
            path: path.to_path_buf(),
            row: index + 1,
            field: field.to_string(),
            found,
        };
        let text = match row.get_column_iter().next().map(|(_, value)| value) {
            Some(Field::Str(text)) => text.clone(),
            Some(Field::Bytes(bytes)) => String::from_utf8(bytes.data().to_vec())
                .map_err(|_| refused("bytes that are not UTF-8".to_string()))?,
            Some(Field::Null) | None => return Err(refused("null".to_string())),
            Some(other) => return Err(refused(format!("{other}"))),
        };
        if !text.is_empty() {
            documents.push(Document {
                source: format!("{}:{}", path.display(), index + 1),
                text,
            });
        }
    }
    Ok(())
}

/// The regular files under `dir` (links followed) into `out`; every other
/// entry into `skipped`, with what it is.
fn collect_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    skipped: &mut Vec<(PathBuf, &'static str)>,
) -> Result<(), DataError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            skipped.push((path, "a broken link or unreadable entry"));
            continue;
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            collect_files(&path, out, skipped)?;
        } else if kind.is_file() {
            out.push(path);
        } else {
            let what = if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device"
            } else {
                "not a regular file"
            };
            skipped.push((path, what));
        }
    }
    Ok(())
}

/// How the documents of a corpus become tokens.
#[derive(Clone, Debug, Default)]
pub enum Tokenizer {
    /// weft's byte tokenizer (see the module's documentation).
    #[default]
    Bytes,
    /// A Hugging Face tokenizer (a model's `tokenizer.json`): each document
    /// is encoded with the tokenizer's own special tokens (a Llama
    /// tokenizer's beginning of sequence, for instance), then closed by
    /// `end`, the model's end-of-sequence token, when it names one.
    File {
        path: PathBuf,
        tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
        end: Option<u32>,
        /// SHA-256 of the file, and the end token: what the token counts,
        /// and so the data order, depend on.
        digest: String,
    },
}

impl Tokenizer {
    /// The tokenizer of `path` (a `tokenizer.json`), closing every document
    /// with `end`.
    pub fn from_file(path: &Path, end: Option<u32>) -> Result<Tokenizer, DataError> {
        use sha2::{Digest, Sha256};
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        // Documents are cut where the run says (--max-seq-len) and never
        // padded: a truncation or padding the file brings would silently
        // change what is trained on.
        tokenizer
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
            .with_padding(None);
        // The end token closes every document: part of the tokens too.
        let digest = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .chain(end.map(|e| format!(",end={e}")))
            .collect();
        Ok(Tokenizer::File {
            path: path.to_path_buf(),
            tokenizer: std::sync::Arc::new(tokenizer),
            end,
            digest,
        })
    }

    /// The tokens of one document (`source` names it in an error).
    pub fn encode(&self, source: &str, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Bytes => Ok(tokenize(text)),
            Tokenizer::File { tokenizer, end, .. } => {
                let encoding = tokenizer
                    .encode(text, true)
                    .map_err(|e| DataError::Tokenize {
                        source_name: source.to_string(),
                        message: e.to_string(),
                    })?;
                let mut ids = encoding.get_ids().to_vec();
                if let Some(end) = end
                    && ids.last() != Some(end)
                {
                    ids.push(*end);
                }
                Ok(ids)
            }
        }
    }

    /// Tokens it can produce: one past the largest id.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Tokenizer::Bytes => BYTE_VOCAB_SIZE,
            Tokenizer::File { tokenizer, end, .. } => {
                let ids = tokenizer
                    .get_vocab(true)
                    .into_values()
                    .max()
                    .map_or(0, |m| m + 1);
                ids.max(end.map_or(0, |e| e + 1))
            }
        }
    }

    /// What a data order drawn with it depends on: nothing for bytes (so
    /// checkpoints from before tokenizers keep their identity), the file's
    /// digest otherwise.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::File { digest, .. } => Some(digest),
        }
    }
}

/// Byte-level tokenization of one document, closed by [`END_OF_DOCUMENT`].
pub fn tokenize(text: &str) -> Vec<u32> {
    text.bytes()
        .map(u32::from)
        .chain(std::iter::once(END_OF_DOCUMENT))
        .collect()
}

/// Inverse of [`tokenize`] for the byte tokens of a sequence (end-of-document dropped).
pub fn detokenize(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .filter_map(|t| u8::try_from(*t).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The order of documents in epoch `epoch`: a permutation that depends on the
/// seed, the epoch and the corpus size only.
pub fn epoch_order(documents: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..documents).collect();
    for i in (1..documents).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// One sequence of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Global sample number: position in the endless, epoch-by-epoch stream.
    pub index: u64,
    /// Document it came from (index into the corpus).
    pub document: usize,
    pub tokens: Vec<u32>,
}

/// One step's global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub samples: Vec<Sample>,
}

impl Batch {
    pub fn tokens(&self) -> usize {
        self.samples.iter().map(|s| s.tokens.len()).sum()
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.samples.iter().map(|s| s.tokens.len()).collect()
    }
}

/// Where the sample stream stands: saved with each checkpoint, so a resumed job,
/// whatever its new world size, continues with exactly the next batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BatchCursor {
    pub next_sample: u64,
}

/// Draws global batches of whole documents from a corpus.
#[derive(Debug)]
pub struct BatchStream<'a> {
    corpus: &'a Corpus,
    tokenizer: &'a Tokenizer,
    seed: u64,
    tokens_per_step: usize,
    max_seq_len: usize,
    cursor: BatchCursor,
    cached_epoch: Option<(u64, Vec<usize>)>,
    /// The document that did not fit the last batch, tokenized (the next
    /// batch starts with it): tokenized once, not twice.
    pending: Option<(u64, Vec<u32>)>,
}

impl<'a> BatchStream<'a> {
    pub fn new(
        corpus: &'a Corpus,
        tokenizer: &'a Tokenizer,
        seed: u64,
        tokens_per_step: usize,
        max_seq_len: usize,
        cursor: BatchCursor,
    ) -> Result<Self, DataError> {
        if tokens_per_step == 0 {
            return Err(DataError::BadSize {
                field: "tokens per step",
                value: 0,
            });
        }
        if max_seq_len == 0 {
            return Err(DataError::BadSize {
                field: "max sequence length",
                value: 0,
            });
        }
        Ok(BatchStream {
            corpus,
            tokenizer,
            seed,
            tokens_per_step,
            max_seq_len,
            cursor,
            cached_epoch: None,
            pending: None,
        })
    }

    pub fn cursor(&self) -> BatchCursor {
        self.cursor
    }

    fn document_at(&mut self, index: u64) -> usize {
        let n = self.corpus.documents.len() as u64;
        let (epoch, position) = (index / n, (index % n) as usize);
        match &self.cached_epoch {
            Some((cached, order)) if *cached == epoch => order[position],
            _ => {
                let order = epoch_order(n as usize, self.seed, epoch);
                let document = order[position];
                self.cached_epoch = Some((epoch, order));
                document
            }
        }
    }

    /// The next batch: whole documents (cut at the maximum sequence length) in
    /// stream order until the next one would overflow the token budget. The
    /// first document of a batch is always taken, cut to the budget if needed.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let mut samples = Vec::new();
        let mut used = 0;
        loop {
            let index = self.cursor.next_sample;
            let document = self.document_at(index);
            let mut tokens = match self.pending.take() {
                Some((pending, tokens)) if pending == index => tokens,
                _ => {
                    let doc = &self.corpus.documents[document];
                    let mut tokens = self.tokenizer.encode(&doc.source, &doc.text)?;
                    tokens.truncate(self.max_seq_len);
                    tokens
                }
            };
            if samples.is_empty() {
                tokens.truncate(self.tokens_per_step);
            } else if used + tokens.len() > self.tokens_per_step {
                self.pending = Some((index, tokens));
                break;
            }
            used += tokens.len();
            samples.push(Sample {
                index,
                document,
                tokens,
            });
            self.cursor.next_sample += 1;
            if used == self.tokens_per_step {
                break;
            }
        }
        Ok(Batch { samples })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `--data-format` and `--data-order` take the job's own enums, named
    /// on the command line as the trainer names them.
    #[test]
    fn the_data_flags_name_the_jobs_settings() {
        use crate::flag_name as flag;
        use clap::ValueEnum;
        for format in DataFormat::value_variants() {
            assert_eq!(flag(format), format.name());
        }
        let orders: Vec<String> = weft_crds::DataOrder::value_variants()
            .iter()
            .map(flag)
            .collect();
        assert_eq!(orders, ["documents", "decomposed"]);
    }

    fn corpus(lengths: &[usize]) -> Corpus {
        Corpus {
            documents: lengths
                .iter()
                .enumerate()
                .map(|(i, n)| Document {
                    source: format!("doc{i}"),
                    text: "x".repeat(*n),
                })
                .collect(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn loads_text_and_jsonl_in_a_fixed_order() {
        let dir = tempdir("load");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.txt"), "second file").unwrap();
        std::fs::write(
            dir.join("a.jsonl"),
            "{\"text\":\"one\"}\n\n{\"text\":\"two\",\"id\":3}\n",
        )
        .unwrap();
        std::fs::write(dir.join("sub/c.md"), "# third").unwrap();
        std::fs::write(dir.join("ignored.bin"), [0xff, 0xfe]).unwrap();
        let corpus = Corpus::load(&dir).unwrap();
        let texts: Vec<_> = corpus.documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "second file", "# third"]);
        assert!(corpus.documents[1].source.ends_with("a.jsonl:3"));
        assert!(corpus.skipped.is_empty());
    }

    /// `--text-field`: JSONL documents read from another field; a line
    /// without it is named, with the field.
    #[test]
    fn jsonl_documents_come_from_the_field_the_run_names() {
        let dir = tempdir("field");
        std::fs::write(
            dir.join("a.jsonl"),
            "{\"content\":\"one\",\"text\":\"no\"}\n{\"content\":\"two\"}\n",
        )
        .unwrap();
        let corpus = Corpus::load_with(&dir, DataFormat::Auto, "content").unwrap();
        let texts: Vec<_> = corpus.documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        let err = Corpus::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl:2") && err.contains("string field \"text\""),
            "{err}"
        );
    }

    /// A pod's check of its data: the files of the format are there, and
    /// the first document line has the field; later lines are the ranks'.
    #[test]
    fn a_corpus_is_checked_by_its_files_and_first_lines() {
        let dir = tempdir("check");
        std::fs::write(
            dir.join("a.jsonl"),
            "\n{\"content\":\"one\"}\n{\"other\":\"two\"}\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.txt"), "text").unwrap();
        assert!(Corpus::check(&dir, DataFormat::Auto, "content").is_ok());
        assert!(Corpus::check(&dir, DataFormat::Text, "content").is_ok());
        let err = Corpus::check(&dir, DataFormat::JsonLines, "body")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.jsonl:2") && err.contains("\"body\""),
            "{err}"
        );
        let err = Corpus::check(&dir, DataFormat::Parquet, "content")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds no documents") && err.contains("parquet"),
            "{err}"
        );
        let err = Corpus::check(&dir.join("none"), DataFormat::Auto, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(Corpus::check(Path::new(BUILTIN_CORPUS), DataFormat::Auto, "text").is_ok());
    }

    #[test]
    fn entries_that_are_not_regular_files_are_skipped_and_named() {
        let dir = tempdir("fifo");
        std::fs::write(dir.join("b.txt"), "a document").unwrap();
        // A FIFO named like a document: reading it would wait for ever.
        let fifo = dir.join("a.txt");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        std::os::unix::fs::symlink(dir.join("gone.txt"), dir.join("c.txt")).unwrap();
        let corpus = Corpus::load(&dir).unwrap();
        assert_eq!(corpus.documents.len(), 1);
        let summary = corpus.skipped_summary().unwrap();
        assert!(summary.contains("a.txt (a FIFO)"), "{summary}");
        assert!(summary.contains("c.txt (a broken link"), "{summary}");
    }

    #[test]
    fn the_digest_follows_the_documents_and_their_order() {
        let doc = |text: &str| Document {
            source: String::new(),
            text: text.to_string(),
        };
        let corpus = |texts: &[&str]| Corpus {
            documents: texts.iter().map(|t| doc(t)).collect(),
            skipped: Vec::new(),
        };
        let ab = corpus(&["a", "b"]).digest();
        assert_eq!(ab.len(), 64);
        assert_eq!(ab, corpus(&["a", "b"]).digest());
        assert_ne!(ab, corpus(&["b", "a"]).digest());
        assert_ne!(ab, corpus(&["ab"]).digest());
        assert_ne!(ab, corpus(&["a", "b", "c"]).digest());
    }

    #[test]
    fn bad_corpora_are_named() {
        let dir = tempdir("bad");
        let missing = dir.join("nope");
        assert!(matches!(
            Corpus::load(&missing),
            Err(DataError::NotFound(_))
        ));
        std::fs::write(dir.join("x.bin"), "zz").unwrap();
        let err = Corpus::load(&dir).unwrap_err();
        assert!(err.to_string().contains("holds no documents"), "{err}");
        std::fs::write(
            dir.join("d.jsonl"),
            "{\"text\":\"ok\"}\n{\"body\":\"no text\"}\n",
        )
        .unwrap();
        let err = Corpus::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("d.jsonl:2") && err.contains("\"text\""),
            "{err}"
        );
        std::fs::write(dir.join("d.jsonl"), "not json\n").unwrap();
        let err = Corpus::load(&dir).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:1"), "{err}");
        std::fs::remove_file(dir.join("d.jsonl")).unwrap();
        std::fs::write(dir.join("e.txt"), [0xff, 0xfe, 0x00]).unwrap();
        let err = Corpus::load(&dir).unwrap_err();
        assert_eq!(err.category(), "corpus_format");
        assert!(err.to_string().contains("e.txt"));
    }

    #[test]
    fn tokenizer_round_trips_utf8() {
        let text = "héllo, 世界";
        let tokens = tokenize(text);
        assert_eq!(*tokens.last().unwrap(), END_OF_DOCUMENT);
        assert_eq!(tokens.len(), text.len() + 1);
        assert_eq!(detokenize(&tokens), text);
        assert!(tokens.iter().all(|t| *t < BYTE_VOCAB_SIZE));
    }

    #[test]
    fn zero_sizes_are_refused() {
        let c = corpus(&[3]);
        assert!(BatchStream::new(&c, &Tokenizer::Bytes, 1, 0, 8, BatchCursor::default()).is_err());
        assert!(BatchStream::new(&c, &Tokenizer::Bytes, 1, 8, 0, BatchCursor::default()).is_err());
    }

    proptest! {
        #[test]
        fn epoch_order_is_a_permutation_fixed_by_the_seed(n in 1usize..300, seed: u64, epoch in 0u64..5) {
            let order = epoch_order(n, seed, epoch);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            prop_assert_eq!(order, epoch_order(n, seed, epoch));
        }

        #[test]
        fn batches_respect_budget_and_resume_exactly(
            lengths in proptest::collection::vec(0usize..200, 1..40),
            seed: u64,
            budget in 1usize..600,
            max_len in 1usize..300,
            split in 0usize..12,
        ) {
            let c = corpus(&lengths);
            let mut straight = BatchStream::new(&c, &Tokenizer::Bytes, seed, budget, max_len, BatchCursor::default()).unwrap();
            let all: Vec<Batch> = (0..12).map(|_| straight.next_batch().unwrap()).collect();
            for b in &all {
                prop_assert!(!b.samples.is_empty());
                prop_assert!(b.tokens() <= budget);
                prop_assert!(b.samples.iter().all(|s| s.tokens.len() <= max_len));
            }
            // Samples are consecutive in the stream: nothing skipped, nothing repeated.
            let indices: Vec<u64> = all.iter().flat_map(|b| b.samples.iter().map(|s| s.index)).collect();
            prop_assert_eq!(indices, (0..all.iter().map(|b| b.samples.len() as u64).sum()).collect::<Vec<_>>());
            // Resuming from a saved cursor gives the same batches.
            let mut first = BatchStream::new(&c, &Tokenizer::Bytes, seed, budget, max_len, BatchCursor::default()).unwrap();
            for _ in 0..split { first.next_batch().unwrap(); }
            let mut resumed = BatchStream::new(&c, &Tokenizer::Bytes, seed, budget, max_len, first.cursor()).unwrap();
            for expected in &all[split..] {
                prop_assert_eq!(&resumed.next_batch().unwrap(), expected);
            }
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_builtin_corpus_is_the_shipped_one() {
        let builtin = Corpus::load(Path::new(BUILTIN_CORPUS)).unwrap();
        let shipped = Corpus::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")).unwrap();
        assert!(builtin.documents.len() > 10);
        assert_eq!(builtin.documents.len(), shipped.documents.len());
        assert!(
            builtin
                .documents
                .iter()
                .zip(&shipped.documents)
                .all(|(a, b)| a.text == b.text)
        );
    }
}
