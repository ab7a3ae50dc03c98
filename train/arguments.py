"""Command-line arguments of train/train.py as HfArgumentParser dataclasses (model, data, tags, training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from datastore.store import DEDUP_THRESHOLD

STAGES = ("pretrain", "finetune", "lora")


@dataclass
class ModelArguments:
    """The model: a new TUNA model around an LLM + CLIP, or a saved TUNA model to continue from."""

    model_name_or_path: str = field(metadata={"help": "LLM (hub name or local path) for a new TUNA model, or a "
                                                      "saved TUNA model directory to continue training"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    stage: str = field(default="finetune", metadata={
        "help": "pretrain: train connector + tag encoder only (LLM frozen), save only them; finetune: LLM "
                "trainable too; lora: LoRA adapters on the LLM + connector + tag encoder"})
    stage1_checkpoint: str | None = field(default=None, metadata={
        "help": "stage-1 output (directory or tuna_trainable.safetensors) to load into the model"})
    clip_model: str = field(default="ViT-L-14-336", metadata={"help": "open_clip architecture"})
    clip_pretrained: str | None = field(default="openai", metadata={
        "help": "open_clip pretrained tag or local checkpoint file ('none' = random init, for tests)"})
    clip_model_config: str | None = field(default=None, metadata={"help": "open_clip model-config JSON"})
    clip_precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16"})
    vision_feature_layer: int = field(default=-2, metadata={"help": "CLIP block giving the patch tokens"})
    connector_type: str = field(default="mlp2x_gelu", metadata={
        "aliases": ["--connector"],
        "help": "linear, mlp{N}x_gelu, or mhub: MMICT's M-Hub, a Q-Former fusing each image with its text "
                "(needs --ablation no_tags; docs/mmict.md)"})
    mhub_queries: int = field(default=32, metadata={"help": "mhub: learned query tokens (the query image's tokens)"})
    mhub_hidden: int = field(default=768, metadata={"help": "mhub: Q-Former width (BLIP-2: 768)"})
    mhub_layers: int = field(default=12, metadata={"help": "mhub: Q-Former layers (BLIP-2: 12)"})
    mhub_heads: int = field(default=12, metadata={"help": "mhub: Q-Former attention heads"})
    mhub_cross_attention_every: int = field(default=2, metadata={
        "help": "mhub: a cross-attention to the image every N layers (BLIP-2: 2)"})
    mhub_max_text: int = field(default=64, metadata={"help": "mhub: guide-text tokens read per image"})
    mhub_demo_features: str = field(default="text", metadata={
        "help": "mhub: text (MMICT: a demo image becomes its visual-guided textual features) or visual (ablation: "
                "textual-guided visual features, as the query)"})
    mhub_qformer: str | None = field(default=None, metadata={
        "help": "mhub: a BLIP-2 checkpoint (folder or .safetensors) to load the Q-Former and query tokens from"})
    template: str = field(default="vicuna_v1", metadata={"help": "plain, vicuna_v1 or chat_template"})
    tag_hidden_dim: int = field(default=256, metadata={"help": "image-aware tag encoder width"})
    tag_num_heads: int = field(default=4, metadata={"help": "tag encoder attention heads"})
    tag_num_layers: int = field(default=1, metadata={"help": "tag encoder cross-attention blocks"})
    tag_queries: int = field(default=1, metadata={"help": "visual tokens per tag"})
    image_patch_positions: bool = field(default=False, metadata={
        "help": "learned position embedding added to the patch features before the connector (for "
                "convolutional CLIP towers, whose features do not say where a patch is)"})
    tag_patch_positions: bool = field(default=True, metadata={
        "help": "learned patch position embedding in the tag encoder's keys/values (a tag's visual token says "
                "where it matched)"})
    freeze_llm: bool = field(default=False, metadata={
        "help": "stage finetune: keep the whole LLM frozen (only the connector / M-Hub and tag encoder train) and "
                "still export a full model, as MMICT's in-context tuning does"})
    freeze_llm_embeddings: bool = field(default=False, metadata={
        "help": "stage finetune: keep the LLM's input embeddings and LM head frozen (the words the LLM knows "
                "keep their vectors, e.g. names the instruction data never uses as answers)"})
    weight_mode: str = field(default="scale_and_bias", metadata={"help": "scale, bias or scale_and_bias"})
    weight_scaling: str = field(default="count", metadata={"help": "count (uniform = 1) or raw (sum 1)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    llm_random_init: bool = field(default=False, metadata={
        "help": "build the LLM from model_name_or_path's config.json with random weights (benchmarks: no weight "
                "files; on CUDA without ZeRO-3 it is built on the GPU, under ZeRO-3 partitioned as it is built)"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (stage lora)"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear' or comma-separated module names (q_proj,v_proj)"})

    def mhub_config(self) -> dict | None:
        """The M-Hub's shape (tuna.mhub.MHubConfig fields) with --connector_type mhub, else None."""
        if self.connector_type != "mhub":
            return None
        return {"num_queries": self.mhub_queries, "hidden_size": self.mhub_hidden, "num_layers": self.mhub_layers,
                "num_heads": self.mhub_heads, "cross_attention_frequency": self.mhub_cross_attention_every,
                "max_text": self.mhub_max_text, "demo_features": self.mhub_demo_features}

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"--stage {self.stage!r}: expected one of {list(STAGES)}")
        if self.mhub_qformer and self.connector_type != "mhub":
            raise ValueError("--mhub_qformer needs --connector_type mhub")
        if self.clip_pretrained in ("", "none", "None"):
            self.clip_pretrained = None


@dataclass
class DataArguments:
    """Training data: LLaVA JSON files with an image folder, and/or webdataset shards."""

    data_path: list[str] = field(default_factory=list, metadata={"help": "LLaVA JSON file(s)"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the JSON's relative image paths"})
    wds_shards: list[str] = field(default_factory=list, metadata={
        "help": "webdataset shards (brace/glob patterns); needs --max_steps"})
    max_length: int = field(default=2048, metadata={"help": "longest sequence after splicing images and tags"})
    on_bad_sample: str = field(default="error", metadata={
        "help": "error: stop naming the sample (missing/unreadable image, missing tags, over-long, tokenization "
                "mismatch); skip: replace it by the next sample and count it"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "batches of only image or only text samples, of similar length (LLaVA)"})

    # in-context tuning (train/icl_tuning.py)
    icl_pool: str | None = field(default=None, metadata={
        "help": "in-context tuning: demonstration pool (`tuna-icl pool build`) whose retrieved examples are put "
                "before a share --icl_p of the --data_path samples, as rounds of their own; the loss is on the "
                "sample's answer only. A sample given demos keeps only its first question/answer round "
                "(train/icl_tuning.py)"})
    icl_retriever: str = field(default="siir", metadata={
        "help": "retriever of the demos: random, siir, sttr, sitr, sit, oracle, or PREFIX:PATH (icl.retrievers); "
                "it never picks the sample itself or another question on its image"})
    icl_shots: str = field(default="1,2,4", metadata={
        "help": "comma-separated shot counts; each sample given demos draws its K from them uniformly"})
    icl_p: float = field(default=0.5, metadata={
        "help": "share of the training samples given K demos, drawn per sample from --seed and the sample index "
                "(the same on every rank, worker, epoch and rerun); 0: plain training"})
    icl_order: str = field(default="similar-last", metadata={
        "help": "prompt order of the demos: similar-last (most similar next to the question), similar-first, "
                "shuffled"})
    icl_demo_tags: bool = field(default=True, metadata={
        "help": "retrieved tags for the demos' images too, from the run's tag source (a cache-only "
                "--retrieval_cache must hold the demo images, else give --datastore for live retrieval); "
                "false: the demos get an empty tag block"})

    def __post_init__(self) -> None:
        if not self.data_path and not self.wds_shards:
            raise ValueError("no training data: give --data_path (LLaVA JSON) and/or --wds_shards")
        from train.icl_tuning import ORDERS, parse_shots

        parse_shots(self.icl_shots)
        if not 0.0 <= self.icl_p <= 1.0:
            raise ValueError(f"--icl_p {self.icl_p}: must be in [0, 1]")
        if self.icl_order not in ORDERS:
            raise ValueError(f"--icl_order {self.icl_order!r}: expected one of {', '.join(ORDERS)}")
        if self.icl_pool is not None:
            if not (Path(self.icl_pool) / "manifest.json").is_file():
                raise ValueError(f"--icl_pool {self.icl_pool}: no demonstration pool there (no manifest.json; "
                                 "build one with `tuna-icl pool build`)")
            if self.wds_shards:
                raise ValueError("--icl_pool works on --data_path (LLaVA JSON) samples only, not --wds_shards")
            from icl.retrievers import RETRIEVERS

            if self.icl_retriever not in RETRIEVERS and ":" not in self.icl_retriever:
                raise ValueError(f"--icl_retriever {self.icl_retriever!r}: expected one of {', '.join(RETRIEVERS)} "
                                 "or PREFIX:PATH")

    def icl_settings(self, seed: int = 0):
        """The in-context tuning settings (train.icl_tuning.ICLSettings), or None without --icl_pool."""
        from train.icl_tuning import ICLSettings

        if self.icl_pool is None:
            return None
        return ICLSettings(pool=self.icl_pool, retriever=self.icl_retriever, shots=self.icl_shots, p=self.icl_p,
                           order=self.icl_order, demo_tags=self.icl_demo_tags, seed=seed)


@dataclass
class TagArguments:
    """Where tags come from and how many are read."""

    retrieval_cache: str | None = field(default=None, metadata={"help": "tuna-datastore cache parquet"})
    datastore: str | None = field(default=None, metadata={"help": "datastore for live retrieval of cache misses"})
    k_images: int = field(default=5, metadata={"help": "neighbour images per live query"})
    max_tags: int = field(default=10, metadata={"help": "tags read per image"})
    tag_temperature: float = field(default=0.1, metadata={"help": "softmax temperature of the adaptive weights"})
    tag_score_prior: float = field(default=0.0, metadata={
        "help": "λ of the adaptive weights' retrieval-score prior: softmax of cos/τ + λ·log(score), the score "
                "being the tag's summed neighbour similarity from the cache / datastore (0: cosine alone)"})
    ablation: str = field(default="none", metadata={
        "help": "none, no_tags (plain LLaVA), random_tags, uniform_weights, no_image_aware, text_tags"})
    random_tags_seed: int = field(default=0, metadata={"help": "seed of the random_tags draw"})
    random_tags_vocab: str | None = field(default=None, metadata={
        "help": "text file, one tag per line, that random_tags draws from (default: the datastore's tags)"})
    min_tag_support: float = field(default=0.0, metadata={
        "help": "read only tags whose entity neighbours holding at least this share of the neighbours' summed "
                "similarity name (datastore.store.filter_by_support; 0: every retrieved tag)"})
    exclude_self: bool = field(default=True, metadata={
        "help": "live retrieval (--datastore) drops the training image's own datastore entry from its neighbours "
                "(key = image path, path without extension or file stem; or cosine >= --dedup_threshold), as "
                "`tuna-datastore cache` does by default: the model must not learn to read its own caption"})
    dedup_threshold: float = field(default=DEDUP_THRESHOLD, metadata={
        "help": "cosine at or above which a neighbour is a copy of the training image (with --exclude_self; "
                "default: exact copies only; e.g. 0.95 for a web CLIP)"})

    rename_p: float = field(default=0.0, metadata={
        "help": "share of training samples whose --rename_names words become random --rename_pool names on "
                "the LLM side (questions, answers, tag words; the tags' CLIP side keeps the real name): the "
                "model cannot answer them from memory, only by reading the tag block (train/rename.py)"})
    rename_names: str | None = field(default=None, metadata={"help": "file: the words to rename, one per line"})
    rename_pool: str | None = field(default=None, metadata={"help": "file: the replacement names, one per line"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tag_support <= 1.0:
            raise ValueError(f"--min_tag_support {self.min_tag_support}: must be in [0, 1]")
        if self.dedup_threshold <= 0:
            raise ValueError(f"--dedup_threshold {self.dedup_threshold}: must be > 0 (a cosine; above 1 turns it off)")
        if not 0.0 <= self.rename_p <= 1.0:
            raise ValueError(f"--rename_p {self.rename_p}: must be in [0, 1]")
        if self.rename_p > 0 and not (self.rename_names and self.rename_pool):
            raise ValueError("--rename_p needs --rename_names and --rename_pool")


@dataclass
class TunaTrainingArguments(TrainingArguments):
    """HF TrainingArguments plus resume and a test hook."""

    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --output_dir"})
    verify_checkpoint: bool = field(default=True, metadata={
        "help": "record the sha256 of every checkpoint file when saving, and on --resume refuse a checkpoint whose "
                "files changed since (its .pt files are pickles that run code when loaded); false skips both "
                "(hashing reads the whole checkpoint: ~100 GB for a 7B finetune)"})
    mm_projector_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the multimodal modules (connector, tag encoder, patch positions) when it should "
                "differ from --learning_rate, which then applies to the LLM (LLaVA's --mm_projector_lr)"})
    stop_after_steps: int = field(default=0, metadata={
        "help": "stop after this many steps without the final export, as if interrupted (for tests)"})
