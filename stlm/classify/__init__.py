"""Classification with pretrained (or scratch) backbones: fine-tuning, probes, FewRel, committees.

CLI: python -m stlm.classify --checkpoint=<export>|scratch --task=agnews|dbpedia|fewrel
       --data_dir=<dir> [--mode=finetune|probe] [--output=file.json] [--committee=<e1>,<e2>]
"""
