"""tfds builders that prepare corpora as ArrayRecord (no TensorFlow needed) for grain.

Every builder yields records {'id': str, 'text': str} in splits 'train' and 'validation'.
`document_sources(data_cfg, split)` prepares what `data.source` names (once; later calls
reuse the files under `data.data_dir`, default ~/.cache/stlm/tfds) and returns random-access
sources with their mixing weights.

The local and built-in builders work offline. The paper's corpora (OpenWebText, Simple
English and English Wikipedia, BabyLM, TinyStories) download from their public URLs through
the tfds download manager: they cannot be prepared on machines without network access.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pathlib
import re

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from stlm.config import errors as config_errors
from stlm.data import corpus
from stlm.data import hf_datasets
from stlm.data import phases

_VERSION = tfds.core.Version('1.0.0')


def default_data_dir(data_cfg) -> str:
  return os.path.expanduser(data_cfg.get('data_dir', '') or '~/.cache/stlm/tfds')


def _val_name(val_fraction: float) -> str:
  return f'val{round(val_fraction * 10000):05d}'  # 0.05 -> 'val00500'


class DocConfig(tfds.core.BuilderConfig):
  """A corpus and how much of it is held out for validation."""

  def __init__(self, *, val_fraction: float = 0.05, name: str | None = None, **kwargs):
    super().__init__(name=name or _val_name(val_fraction), version=_VERSION, **kwargs)
    self.val_fraction = float(val_fraction)


class LocalTextConfig(DocConfig):
  """A local directory; the name hashes everything that changes its documents."""

  def __init__(self, *, path: str, split_by: str = 'auto', eot_marker: str = '<|endoftext|>',
               jsonl_field: str = 'text', val_fraction: float = 0.05,
               decode_errors: str = 'strict'):
    root = pathlib.Path(path).expanduser().resolve()
    files = corpus.corpus_files(root)
    # File sizes and times are in the key so edited corpora are prepared again.
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = repr((str(root), split_by, eot_marker, jsonl_field, val_fraction, decode_errors,
                stamp))
    slug = re.sub(r'[^A-Za-z0-9]+', '_', root.name).strip('_')[:40] or 'corpus'
    super().__init__(name=f'{slug}_{hashlib.sha1(key.encode()).hexdigest()[:12]}',
                     val_fraction=val_fraction, description=f'{root} split by {split_by}')
    self.path, self.split_by = str(root), split_by
    self.eot_marker, self.jsonl_field = eot_marker, jsonl_field
    self.decode_errors = decode_errors


class _DocBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared features and the hash split for corpora without their own validation set."""

  VERSION = _VERSION

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup needs the `importlib_resources` backport for package modules.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` wants metadata files beside the code.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({'id': tfds.features.Text(),
                                             'text': tfds.features.Text()}))

  def _documents(self, dl_manager):
    """(key, text) of the whole corpus, for builders split here by hash."""
    raise NotImplementedError

  # Large corpora are split while streaming (two passes, nothing held in memory) by the
  # same text hash; small ones in memory, which also guarantees a non-empty validation set.
  STREAMING = False

  @classmethod
  def config_for(cls, argument: str, data_cfg):
    """The config to build for data_cfg; `argument` is what follows ':' in the source name.
    The paper corpora use one fixed release and held-out fraction."""
    del data_cfg
    _no_argument(cls, argument)
    return cls.BUILDER_CONFIGS[0]

  def _streaming(self) -> bool:
    return self.STREAMING

  def _split_generators(self, dl_manager):
    frac = self.builder_config.val_fraction
    if self._streaming():
      def part(val):
        return ((k, t) for k, t in self._documents(dl_manager)
                if (corpus.doc_hash_fraction(t) < frac) == val)
      return {'train': self._generate_examples(part(False)),
              'validation': self._generate_examples(part(True))}
    splits = corpus.split_documents(list(self._documents(dl_manager)), frac)
    return {name: self._generate_examples(ds) for name, ds in splits.items()}

  def _generate_examples(self, docs):
    for key, text in docs:
      yield key, {'id': key, 'text': text}


class StlmLocalText(_DocBuilder):
  """A local directory of .txt/.jsonl files (see `stlm.data.corpus`)."""

  BUILDER_CONFIGS = []  # Made per directory: LocalTextConfig(path=...).

  @classmethod
  def config_for(cls, argument, data_cfg):
    _no_argument(cls, argument)
    return LocalTextConfig(path=data_cfg.path, split_by=data_cfg.split_by,
                           eot_marker=data_cfg.eot_marker, jsonl_field=data_cfg.jsonl_field,
                           val_fraction=data_cfg.val_fraction,
                           decode_errors=data_cfg.get('decode_errors', 'strict'))

  def _documents(self, dl_manager):
    c = self.builder_config
    return corpus.local_documents(c.path, c.split_by, c.eot_marker, c.jsonl_field,
                                  c.decode_errors)


class InstructConfig(DocConfig):
  """An instruction file (.json list or .jsonl); the name hashes what changes its items."""

  def __init__(self, *, path: str, layout: str = 'auto', val_fraction: float = 0.05):
    f = pathlib.Path(path).expanduser().resolve()
    if not f.is_file():
      raise corpus.CorpusError(f"config.data.path={path!r}: data.source='instruct' needs an "
                               'instruction file (.json list or .jsonl)')
    stamp = (str(f), f.stat().st_size, f.stat().st_mtime_ns)
    key = repr((stamp, layout, val_fraction))
    slug = re.sub(r'[^A-Za-z0-9]+', '_', f.stem).strip('_')[:40] or 'instruct'
    super().__init__(name=f'{slug}_{hashlib.sha1(key.encode()).hexdigest()[:12]}',
                     val_fraction=val_fraction, description=f'{f} ({layout} layout)')
    self.path, self.layout = str(f), layout


class StlmInstruct(_DocBuilder):
  """Instruction data (stlm/data/chat.py layouts): one record per item, its conversation as
  JSON; held out by item (a hash of the conversation)."""

  BUILDER_CONFIGS = []  # Made per file: InstructConfig(path=...).

  @classmethod
  def config_for(cls, argument, data_cfg):
    _no_argument(cls, argument)
    return InstructConfig(path=data_cfg.path, layout=data_cfg.get('instruct_layout', 'auto'),
                          val_fraction=data_cfg.val_fraction)

  def _documents(self, dl_manager):
    from stlm.data import chat  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    for i, turns in enumerate(chat.read_conversations(c.path, c.layout)):
      yield f'item/{i}', chat.encode_record(turns)


class StlmBuiltin(_DocBuilder):
  """Python's own documentation topics (`pydoc_data.topics`): offline, ~0.47 MB."""

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.05)]

  @classmethod
  def config_for(cls, argument, data_cfg):
    _no_argument(cls, argument)
    config = DocConfig(val_fraction=data_cfg.val_fraction)
    if any(c.name == config.name for c in cls.BUILDER_CONFIGS):
      return config.name  # tfds refuses an equal-named custom config object.
    return config

  def _documents(self, dl_manager):
    return corpus.builtin_documents()


class HfConfig(DocConfig):
  """A Hugging Face dataset (hf_datasets.Spec); the name hashes what decides its documents."""

  def __init__(self, *, spec: hf_datasets.Spec, val_fraction: float):
    val_fraction = 0.0 if spec.val_split else val_fraction
    slug = re.sub(r'[^A-Za-z0-9]+', '_', f'{spec.name}_{spec.config}').strip('_')[:40]
    super().__init__(name=f'{slug}_{hf_datasets.digest(spec, val_fraction)}',
                     val_fraction=val_fraction,
                     description=f'Hugging Face dataset {spec.name} {spec.config}'.strip())
    self.spec = spec


class StlmHfDataset(_DocBuilder):
  """A Hugging Face dataset read through `datasets` (stlm/data/hf_datasets.py). A Hub dataset
  needs network (or the HF cache) while it is prepared; local files do not."""

  BUILDER_CONFIGS = []  # Made per dataset: HfConfig(spec=...).

  @classmethod
  def config_for(cls, argument, data_cfg):
    name = f'{hf_datasets.SOURCE}:{argument}' if argument else hf_datasets.SOURCE
    return HfConfig(spec=hf_datasets.resolve(name, data_cfg), val_fraction=data_cfg.val_fraction)

  def _streaming(self) -> bool:
    return self.builder_config.spec.streaming

  def _cache_dir(self) -> str:
    return os.path.join(os.fspath(self.data_dir_root), 'hf_cache')

  def _split_generators(self, dl_manager):
    spec = self.builder_config.spec
    if not spec.val_split:
      return super()._split_generators(dl_manager)
    return {name: self._generate_examples(hf_datasets.documents(spec, split, self._cache_dir()))
            for name, split in (('train', spec.split), ('validation', spec.val_split))}

  def _documents(self, dl_manager):
    spec = self.builder_config.spec
    return hf_datasets.documents(spec, spec.split, self._cache_dir())


class StlmTinyStories(_DocBuilder):
  """TinyStories v2 (GPT-4 stories), official train/valid files. Needs network."""

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.0, name='v2')]
  URL = 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'

  def _split_generators(self, dl_manager):
    paths = dl_manager.download({'train': self.URL + 'TinyStoriesV2-GPT4-train.txt',
                                 'validation': self.URL + 'TinyStoriesV2-GPT4-valid.txt'})
    return {split: self._generate_examples(self._stories(split, p))
            for split, p in paths.items()}

  def _stories(self, split, path):
    text = pathlib.Path(path).read_text('utf-8', errors='replace')
    for i, story in enumerate(corpus.split_text(text, 'eot', '<|endoftext|>')):
      yield f'{split}/{i}', story


class StlmWikipediaSimple(_DocBuilder):
  """Simple English Wikipedia (wikimedia/wikipedia 20231101.simple parquet). Needs network."""

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.01)]
  PARQUET = ['https://huggingface.co/datasets/wikimedia/wikipedia/resolve/main/'
             '20231101.simple/train-00000-of-00001.parquet']

  STREAMING = True

  def _documents(self, dl_manager):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for path in dl_manager.download(self.PARQUET):
      for batch in pq.ParquetFile(path).iter_batches(1024, columns=['id', 'title', 'text']):
        for row in batch.to_pylist():
          if row['text'].strip():
            yield f"wiki/{row['id']}", f"{row['title']}\n\n{row['text'].strip()}"


class StlmWikipediaEn(StlmWikipediaSimple):
  """English Wikipedia (wikimedia/wikipedia 20231101.en, 41 parquet files). Needs network."""

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.001)]
  PARQUET = ['https://huggingface.co/datasets/wikimedia/wikipedia/resolve/main/'
             f'20231101.en/train-{i:05d}-of-00041.parquet' for i in range(41)]


class StlmOpenWebText(_DocBuilder):
  """OpenWebText (Gokaslan & Cohen 2019, Zenodo record 3834942). Needs network, ~12 GB.

  The archive holds one .xz tarball per subset, each holding one .txt file per web page.
  """

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.0005)]
  URL = 'https://zenodo.org/records/3834942/files/openwebtext.tar.xz'
  STREAMING = True

  def _documents(self, dl_manager):
    import tarfile  # pylint: disable=g-import-not-at-top
    archive = dl_manager.download(self.URL)
    for subset_name, subset in dl_manager.iter_archive(archive):
      with tarfile.open(fileobj=subset, mode='r|xz') as inner:  # stream: no seeks
        for member in inner:
          if member.isfile() and member.name.endswith('.txt'):
            text = inner.extractfile(member).read().decode('utf-8', errors='replace')
            if text.strip():
              yield f'{subset_name}/{member.name}', text.strip()


class StlmBabyLm(_DocBuilder):
  """BabyLM 2023 strict (100M words) train + dev data. Needs network.

  Files hold one utterance or paragraph a line; runs of 64 lines make one document so the
  model sees some context (the release has no document boundaries).
  """

  BUILDER_CONFIGS = [DocConfig(val_fraction=0.0, name='strict_100m')]
  URL = 'https://github.com/babylm/babylm.github.io/raw/main/babylm_data.zip'
  LINES_PER_DOC = 64

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.download_and_extract(self.URL))
    data = next(root.rglob('babylm_100M')).parent
    return {'train': self._generate_examples(self._docs(data / 'babylm_100M')),
            'validation': self._generate_examples(self._docs(data / 'babylm_dev'))}

  def _docs(self, folder):
    for f in sorted(folder.iterdir()):
      lines = [l for l in f.read_text('utf-8', errors='replace').split('\n') if l.strip()]
      for i in range(0, len(lines), self.LINES_PER_DOC):
        yield f'{f.name}/{i}', '\n'.join(lines[i:i + self.LINES_PER_DOC])


# data.source (and data.mix keys) -> builder class; 'local' and 'builtin' work offline, and
# 'hf' on local files. A name may carry an argument after ':' ('hf:tinystories').
BUILDERS = {
    'builtin': StlmBuiltin,
    'local': StlmLocalText,
    'instruct': StlmInstruct,
    hf_datasets.SOURCE: StlmHfDataset,
    'tinystories': StlmTinyStories,
    'wikipedia_simple': StlmWikipediaSimple,
    'wikipedia_en': StlmWikipediaEn,
    'openwebtext': StlmOpenWebText,
    'babylm': StlmBabyLm,
}


def _no_argument(cls, argument: str) -> None:
  if argument:
    name = next(k for k, v in BUILDERS.items() if v is cls)
    raise ValueError(f'Data source {name!r} takes no argument after ":" (got {argument!r}).')


def make_builder(name: str, data_cfg) -> tfds.core.DatasetBuilder:
  """The builder for source `name` with `data_cfg`'s path, split rule and val fraction."""
  base, _, argument = name.partition(':')
  if base not in BUILDERS:
    raise ValueError(f'Unknown data source {name!r}; choose one of {", ".join(BUILDERS)} '
                     "or 'mix'.")
  cls = BUILDERS[base]
  return cls(config=cls.config_for(argument, data_cfg), data_dir=default_data_dir(data_cfg),
             file_format='array_record')


def prepare(name: str, data_cfg) -> tfds.core.DatasetBuilder:
  """Prepares source `name` if not done yet (idempotent) and returns its builder."""
  builder = make_builder(name, data_cfg)
  if not builder.is_prepared():
    tfds.display_progress_bar(False)
    builder.download_and_prepare(file_format='array_record')
  return builder


# Keys of the data section that say which documents a phase reads, not how they are read.
_RUN_WIDE_KEYS = ('phases', 'sources', 'mix')


def source_config(data_cfg, name: str):
  """The single-source data section that source `name` of `data.phases` reads.

  A name of `data.sources` takes that entry's keys over the data section (its `source`
  defaulting to 'local'); any other builder name reads the data section as
  `data.source=name` would. ConfigError names the key for an unknown name or a bad entry.
  """
  sources = data_cfg.get('sources') or {}
  plain = data_cfg.to_dict() if hasattr(data_cfg, 'to_dict') else dict(data_cfg)
  if name in sources:
    entry = sources[name]
    entry = entry.to_dict() if hasattr(entry, 'to_dict') else entry
    if not isinstance(entry, dict):
      config_errors.fail(f'data.sources.{name}', entry,
                         "must be a dict of data keys, such as {'path': ...}")
    for key, value in entry.items():
      if key not in plain or key in _RUN_WIDE_KEYS:
        config_errors.fail(f'data.sources.{name}.{key}', value,
                           'not a key a source can set; use keys of the data section such as '
                           'source, path, split_by, jsonl_field')
    plain.update({'source': 'local', **entry})
    if plain['source'].partition(':')[0] not in BUILDERS:
      config_errors.fail(f'data.sources.{name}.source', plain['source'],
                         f'unknown builder; choose one of {", ".join(BUILDERS)}')
  elif name in BUILDERS:
    plain['source'] = name
  else:
    known = sorted(sources) + list(BUILDERS)
    config_errors.fail('data.phases', data_cfg.get('phases', ''),
                       f'unknown source {name!r}; choose one of {", ".join(known)} '
                       '(a name of data.sources or a builder)')
  if plain['source'] == 'local' and not plain.get('path'):
    key = f'data.sources.{name}.path' if name in sources else 'data.path'
    config_errors.fail(key, plain.get('path', ''),
                       'a local source needs a directory or file of .txt/.jsonl documents')
  plain.update(phases='', sources={}, mix={})
  return ml_collections.ConfigDict(plain)


def named_sources(data_cfg) -> dict[str, tuple[str, object]]:
  """{name: (builder name, its data section)} of every source the run reads, sorted by name:
  the phases' sources, else data.mix's, else data.source."""
  specs = phases.parse(data_cfg.get('phases', '') or '')
  if specs:
    configs = {n: source_config(data_cfg, n) for n in phases.source_names(specs)}
    return {n: (c.source, c) for n, c in configs.items()}
  names = sorted(dict(data_cfg.mix)) if data_cfg.source == 'mix' else [data_cfg.source]
  return {n: (n, data_cfg) for n in names}


def prepare_all(data_cfg) -> None:
  """Prepares every source the run reads (idempotent)."""
  for builder_name, cfg in named_sources(data_cfg).values():
    prepare(builder_name, cfg)


def fingerprint(data_cfg) -> dict[str, dict]:
  """{source: its prepared dataset's name (for a local corpus it hashes the file list, sizes
  and times) and documents per split}: what a resumed run must find unchanged, or its data
  order would silently differ."""
  out = {}
  for name, (builder_name, cfg) in named_sources(data_cfg).items():
    info = prepare(builder_name, cfg).info
    out[name] = dict(dataset=info.full_name,
                     documents={s: int(v.num_examples) for s, v in sorted(info.splits.items())})
  return out


def document_sources(data_cfg, split: str) -> dict[str, tuple[object, float]]:
  """{source name: (random-access source of {'id','text'} bytes records, weight)}.

  With phases: every source any phase reads, weight 1 (what evaluation and a tokenizer read);
  `phase_document_sources` gives one phase's mix.
  """
  specs = phases.parse(data_cfg.get('phases', '') or '')
  if specs:
    return {name: (prepare(builder_name, cfg).as_data_source(split=split), 1.0)
            for name, (builder_name, cfg) in named_sources(data_cfg).items()}
  if data_cfg.source == 'mix':
    weights = dict(data_cfg.mix)
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
      raise ValueError(f'data.mix={weights} must map source names to weights >= 0 '
                       'with a positive sum.')
    weights = phases.tempered(weights, float(data_cfg.get('mix_temperature', 1.0)))
  else:
    weights = {data_cfg.source: 1.0}
  return {name: (prepare(name, data_cfg).as_data_source(split=split), float(w))
          for name, w in sorted(weights.items()) if w > 0}


def phase_document_sources(data_cfg, phase: phases.Phase, split: str
                           ) -> dict[str, tuple[object, float]]:
  """{source name: (random-access source, tempered weight)} of one phase, sorted by name."""
  weights = phases.tempered(dict(phase.parts), float(data_cfg.get('mix_temperature', 1.0)))
  out = {}
  for name in sorted(weights):
    cfg = source_config(data_cfg, name)
    out[name] = (prepare(cfg.source, cfg).as_data_source(split=split), weights[name])
  return out


def record_text(record) -> str:
  """The document text of a source record (tfds returns Text features as bytes)."""
  text = record['text']
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
