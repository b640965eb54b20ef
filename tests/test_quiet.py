"""The third-party messages glm-portable silences, and only those."""

from __future__ import annotations

import logging
import warnings

from glm_portable.quiet import QUIET_LOGS, quiet_third_party


def test_each_listed_message_is_dropped_and_the_rest_of_its_logger_kept(caplog):
    quiet_third_party()
    quiet_third_party()  # a second start adds no second filter
    for name, prefixes in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning(prefixes[0] + " and the rest of that message")
            logger.warning("something that concerns the user")
        assert [r.getMessage() for r in caplog.records if r.name == name] == ["something that concerns the user"]


def test_peft_s_old_property_name_warning_is_ignored_and_others_are_not():
    quiet_third_party()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["another deprecation"]
