"""The decoding floor: ``Engine`` (an engine directory opened on its runtime), sampling,
cached and speculative decoding, layer-skip routing at decode time, chat sessions. Imports
runtimes/ and ir/, never the compiler."""
