# Not part of `all`: run `snakemake train --config training='{data: [DIR], output: models/mine}'`.
rule train:
    input:
        config["training"]["data"],
    output:
        directory(config["training"]["output"]),
    params:
        init=f"--init {config['training']['init']}" if config["training"]["init"] else "",
        epochs=config["training"]["epochs"],
        steps=config["training"]["steps_per_epoch"],
        batch_size=config["training"]["batch_size"],
        patch=config["training"]["patch"],
        learning_rate=config["training"]["learning_rate"],
    threads: 2
    log:
        f"{OUT}/logs/train.log",
    benchmark:
        f"{OUT}/benchmarks/train.tsv"
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        "../../envs/vesicleflow-gpu.yaml"
    shell:
        "vesicleflow train {input:q} -o {output:q} {params.init} --epochs {params.epochs} "
        "--steps-per-epoch {params.steps} --batch-size {params.batch_size} --patch {params.patch} "
        "--learning-rate {params.learning_rate} 2> {log:q}"
