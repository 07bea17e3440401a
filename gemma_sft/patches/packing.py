"""TRL packs through `datasets.map` in batches; this packs the whole sample in one (switch pack_in_one_pass)."""

# TRL packs through `datasets.map` at its default batch of 1,000 samples and best-fit packing leaves a part-filled row
# at the end of each batch: with rows padded to one shape, about one step in eight of the mission recipe was mostly
# padding. One batch for the whole sample leaves one such row per epoch. TRL offers no public way to set that batch
# without preparing (labelling, shuffling, packing) the dataset ourselves.
PACKING_BATCH = 100_000


def install() -> None:
    from trl.trainer import sft_trainer

    trl_pack = sft_trainer.__dict__["pack_dataset"]
    if getattr(trl_pack, "trl_pack", None):
        return

    def pack_dataset(dataset, seq_length, strategy="bfd", map_kwargs=None):
        return trl_pack(dataset, seq_length, strategy, {**(map_kwargs or {}), "batch_size": PACKING_BATCH})

    pack_dataset.trl_pack = trl_pack
    sft_trainer.pack_dataset = pack_dataset


def uninstall() -> None:
    from trl.trainer import sft_trainer

    sft_trainer.pack_dataset = getattr(sft_trainer.pack_dataset, "trl_pack", sft_trainer.pack_dataset)
