rule tile:
    input:
        normalized=rules.normalize.output[0],
        model=MODEL_FILES,
    output:
        f"{OUT}/{{dataset}}/{{tomo}}/tiles.json",
    params:
        model=model_dir_of,
        window=(
            f"--window {config['inference']['window']}"
            if config["inference"]["window"]
            else ""
        ),
        overlap=config["inference"]["overlap"],
        shards=config["inference"]["shards"],
    log:
        f"{OUT}/logs/tile/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/tile/{{dataset}}/{{tomo}}.tsv"
    resources:
        mem_mb=stage_memory_mb("tile"),
        runtime=5,
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow tile {input.normalized:q} {output:q} --model {params.model:q} "
        "{params.window} --overlap {params.overlap} --shards {params.shards} 2> {log:q}"


rule infer:
    input:
        normalized=rules.normalize.output[0],
        plan=rules.tile.output[0],
        model=MODEL_FILES,
    output:
        temp(directory(f"{OUT}/{{dataset}}/{{tomo}}/shards/shard_{{shard}}.zarr")),
    params:
        model=model_dir_of,
        batch_size=(
            ""
            if config["inference"]["batch_size"] == "auto"
            else f"--batch-size {config['inference']['batch_size']}"
        ),
        tta="--tta" if config["inference"]["tta"] else "--no-tta",
        device=config["inference"]["device"],
        precision=config["inference"]["precision"],
    threads: 2
    log:
        f"{OUT}/logs/infer/{{dataset}}/{{tomo}}/shard_{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/infer/{{dataset}}/{{tomo}}/shard_{{shard}}.tsv"
    resources:
        mem_mb=stage_memory_mb("infer"),
        runtime=runtime_min(30, 60),
    conda:
        "../../envs/vesicleflow-gpu.yaml"
    shell:
        "vesicleflow infer {input.normalized:q} {input.plan:q} {output:q} --shard {wildcards.shard} "
        "--model {params.model:q} {params.batch_size} {params.tta} "
        "--device {params.device} --precision {params.precision} --threads {threads} 2> {log:q}"


rule stitch:
    input:
        normalized=rules.normalize.output[0],
        shards=expand(
            f"{OUT}/{{{{dataset}}}}/{{{{tomo}}}}/shards/shard_{{shard}}.zarr", shard=SHARDS
        ),
    output:
        directory(f"{OUT}/{{dataset}}/{{tomo}}/probability.zarr"),
    log:
        f"{OUT}/logs/stitch/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/stitch/{{dataset}}/{{tomo}}.tsv"
    threads: 2
    resources:
        mem_mb=stage_memory_mb("stitch"),
        runtime=runtime_min(10, 10),
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow stitch {output:q} --normalized {input.normalized:q} {input.shards:q} "
        "--threads {threads} 2> {log:q}"
