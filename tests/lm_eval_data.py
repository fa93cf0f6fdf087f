"""A local lm-eval task folder over a local image dataset, for the lm-eval bridge tests (offline).

Four coloured pictures with questions, saved as parquet by `datasets` (its Image feature kept), and
lm-eval YAML files that read it through `dataset_path: parquet` + `data_files`:

- `tiny_vqa`: `<image>{{question}}`, exact match (case-insensitive), stop at "zzz", 8 new tokens;
- `tiny_vqa_regex`: the first three documents (`process_docs`, a function in utils.py), two filters
  (`none`, and `first_word`: a regex taking the first word), exact match;
- `tiny_group`: both, exact match aggregated weighted by size (4 and 3 documents);
- `tiny_mc`: a multiple-choice task (loglikelihood), which realign refuses;
- `tiny_multi`: two images per document (`image`, `image2`), which realign refuses unless told to skip them.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = ("red", "green", "blue", "white")
QUESTIONS = ("What color?", "Name it.", "Is it blue?", "Say hi.")
ANSWERS = ("red", "green", "yes", "hi")
MAX_GEN_TOKS = 8

TASK_YAML = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_image: [image]
doc_to_text: "<image>{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["zzz"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
{extra}metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: {version}
"""

REGEX_FILTER = """process_docs: !function utils.first_three
filter_list:
  - name: none
    filter:
      - function: take_first
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z]+)"
      - function: take_first
"""

UTILS_PY = """def first_three(dataset):
    return dataset.select(range(3))
"""

GROUP_YAML = """group: tiny_group
task: [tiny_vqa, tiny_vqa_regex]
aggregate_metric_list:
  - metric: exact_match
    aggregation: mean
    weight_by_size: true
metadata:
  version: 2.0
"""

MC_YAML = """task: tiny_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["red", "green"]
doc_to_target: 0
metric_list:
  - metric: acc
"""

MULTI_YAML = """task: tiny_multi
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_image: [image, image2]
doc_to_text: "<image><image>{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


def images() -> list:
    from PIL import Image

    return [Image.new("RGB", (40, 30), c) for c in COLOURS]


def write_task_dir(root: Path, version: str = "1.0") -> Path:
    """Write the dataset and the YAML files under `root`; return the task folder (include_path)."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.parquet"
    pictures = images()
    ds = datasets.Dataset.from_dict({"question": list(QUESTIONS), "answer": list(ANSWERS), "image": pictures,
                                     "image2": pictures[::-1]})
    ds.cast_column("image", datasets.Image()).cast_column("image2", datasets.Image()).to_parquet(str(data))
    folder = root / "tasks"
    folder.mkdir(exist_ok=True)
    common = {"data": data, "max_gen_toks": MAX_GEN_TOKS, "version": version}
    (folder / "tiny_vqa.yaml").write_text(TASK_YAML.format(name="tiny_vqa", extra="", **common))
    (folder / "tiny_vqa_regex.yaml").write_text(TASK_YAML.format(name="tiny_vqa_regex", extra=REGEX_FILTER, **common))
    (folder / "utils.py").write_text(UTILS_PY)
    (folder / "tiny_group.yaml").write_text(GROUP_YAML)
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    (folder / "tiny_multi.yaml").write_text(MULTI_YAML.format(data=data))
    return folder


def task_spec(folder: Path, tasks: str = "tiny_vqa", **extra: str) -> str:
    """The realign task spec of lm-eval tasks in `folder` (without lm-eval's built-in index)."""
    rest = "".join(f",{k}={v}" for k, v in extra.items())
    return f"lm_eval:tasks={tasks},include_path={folder},include_defaults=false{rest}"
