rule normalize:
    input:
        tomogram=tomogram_path,
        model=MODEL_FILES,
    output:
        directory(f"{OUT}/{{dataset}}/{{tomo}}/normalized.zarr"),
    params:
        model=model_dir_of,
        voxel_size=voxel_size_option,
    log:
        f"{OUT}/logs/normalize/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/normalize/{{dataset}}/{{tomo}}.tsv"
    threads: 2
    resources:
        mem_mb=stage_memory_mb("normalize"),
        runtime=runtime_min(10, 10),
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow normalize {input.tomogram:q} {output:q} --model {params.model:q} "
        "{params.voxel_size} --threads {threads} 2> {log:q}"
