"""List MatMul/Gemm nodes, their weight initializer names/shapes, and the torch module they came from."""
import sys, onnx, numpy as np
from onnx import numpy_helper
for f in sys.argv[1:] or ["llama", "gpt2", "gpt_neox", "bert"]:
    m = onnx.load(f"/tmp/onnx-research/onnx/{f}/model.onnx")
    inits = {i.name: i for i in m.graph.initializer}
    print(f"== {f}: {len(inits)} initializers; sample names:", list(inits)[:6])
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            w = [x for x in n.input if x in inits]
            shp = [list(inits[x].dims) for x in w]
            print(f"  {n.op_type:6s} node={n.name:45s} inputs={list(n.input)} init={w} {shp}")
