"""hf_moe_routers stand-in for transformers' ``tests/utils/test_configuration_utils.py`` (not in the sdist).

``ConfigTester.check_config_arguments_init`` builds a config from ``config_common_kwargs`` and checks
every value reads back. These are the common ``PreTrainedConfig`` fields, each with a non-default value.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
