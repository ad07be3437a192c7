rule export:
    input:
        spheres=rules.spherefit.output[0],
        labels=rules.postprocess.output[0],
        tomogram=tomogram_path,
        mask=mask_path,
    output:
        vesicles=f"{OUT}/{{dataset}}/{{tomo}}/vesicles.csv",
        labels=f"{OUT}/{{dataset}}/{{tomo}}/labels.mrc",
        info=f"{OUT}/{{dataset}}/{{tomo}}/tomogram.json",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.vesicles),
        voxel_size=voxel_size_option,
        mask=mask_option,
    log:
        f"{OUT}/logs/export/{{dataset}}/{{tomo}}.log",
    benchmark:
        f"{OUT}/benchmarks/export/{{dataset}}/{{tomo}}.tsv"
    resources:
        mem_mb=memory_mb(1000, 0.2),
        runtime=runtime_min(10, 10),
    conda:
        "../../envs/vesicleflow.yaml"
    shell:
        "vesicleflow export {input.spheres:q} {input.labels:q} {input.tomogram:q} "
        "{params.out_dir:q} --dataset {wildcards.dataset:q} --name {wildcards.tomo:q} "
        "{params.voxel_size} {params.mask} 2> {log:q}"
