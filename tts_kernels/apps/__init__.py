"""The applications, above the library: the ``tts-kernels`` command (:mod:`.cli`) and what it runs:
``demo`` (:mod:`.demo`), ``eval`` (:mod:`.evaluate` with :mod:`.eval_data`, :mod:`.eval_parts`,
:mod:`.eval_lock`, :mod:`.grading`), ``check`` (:mod:`.check`), ``bench``; tables, summaries and plots in :mod:`.report`.
Nothing in the library imports this package."""
