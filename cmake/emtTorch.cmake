# Finds LibTorch for emt and for projects that link emt::emt, as one imported target `emt::torch` (so the
# installed package names no path of the build machine's LibTorch: a consumer finds LibTorch again where it
# lives). Sets TORCH_LIBRARIES (= emt::torch) and Torch_VERSION. How LibTorch is found is chosen by
# EMT_TORCH_IMPORT:
#   config     (default) find_package(Torch): LibTorch's own package file. A CUDA build of LibTorch (the PyPI
#              wheel, the CUDA LibTorch zip) then asks CMake for a CUDA toolkit with nvcc, even though emt
#              compiles no CUDA code.
#   libraries  the headers and shared libraries of the LibTorch whose TorchConfig.cmake lies under Torch_DIR,
#              EMT_TORCH_ROOT or an entry of CMAKE_PREFIX_PATH (e.g. python -c 'import torch;
#              print(torch.utils.cmake_prefix_path)'), used directly: no CUDA toolkit is needed. A CUDA build's
#              libtorch_cuda/libc10_cuda are linked too (kept with --no-as-needed, as LibTorch's own package
#              does), so CUDA devices work at run time where the driver and the wheel's nvidia libraries are.
# PyTorch's wheels export copies of std::filesystem from libtorch.so and libtorch_cpu.so; if one of those wins
# symbol lookup, std::filesystem::remove_all crashes (a call through a null pointer, measured with 2.9.1). Putting
# the system libstdc++ first among the needed libraries makes its definitions win, as they should.
set(EMT_STDCXX_FIRST "-Wl,--push-state,--no-as-needed" "stdc++" "-Wl,--pop-state")

# emt::torch from what find_package(Torch) / find_dependency(Torch) left in TORCH_LIBRARIES (config mode).
macro(emt_torch_target_from_config)
  if(NOT TARGET emt::torch)
    add_library(emt::torch INTERFACE IMPORTED GLOBAL)
    set_target_properties(emt::torch PROPERTIES INTERFACE_LINK_LIBRARIES "${EMT_STDCXX_FIRST};${TORCH_LIBRARIES}")
  endif()
  if(NOT Torch_VERSION AND DEFINED Torch_VERSION_STRING)
    set(Torch_VERSION "${Torch_VERSION_STRING}")
  endif()
  set(TORCH_LIBRARIES emt::torch)
endmacro()

macro(emt_find_torch)
  if(NOT EMT_TORCH_IMPORT OR EMT_TORCH_IMPORT STREQUAL "config")
    find_package(Torch REQUIRED)
    emt_torch_target_from_config()
  elseif(EMT_TORCH_IMPORT STREQUAL "libraries")
    set(_emt_torch_cfg "")
    foreach(_p ${Torch_DIR} ${EMT_TORCH_ROOT} ${CMAKE_PREFIX_PATH})
      foreach(_s "" Torch share/cmake/Torch)
        if(NOT _emt_torch_cfg AND EXISTS "${_p}/${_s}/TorchConfig.cmake")
          get_filename_component(_emt_torch_cfg "${_p}/${_s}/TorchConfig.cmake" ABSOLUTE)
        endif()
      endforeach()
    endforeach()
    if(NOT _emt_torch_cfg)
      message(FATAL_ERROR "EMT_TORCH_IMPORT=libraries: no TorchConfig.cmake under Torch_DIR, EMT_TORCH_ROOT or "
        "CMAKE_PREFIX_PATH (searched: ${Torch_DIR} ${EMT_TORCH_ROOT} ${CMAKE_PREFIX_PATH}). Pass "
        "-DCMAKE_PREFIX_PATH=\"$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')\".")
    endif()
    get_filename_component(_emt_torch_dir "${_emt_torch_cfg}" DIRECTORY)
    get_filename_component(_emt_torch_root "${_emt_torch_dir}/../../.." ABSOLUTE)
    file(STRINGS "${_emt_torch_dir}/TorchConfigVersion.cmake" _emt_torch_ver REGEX "set\\(PACKAGE_VERSION ")
    string(REGEX REPLACE ".*\"([^\"]+)\".*" "\\1" Torch_VERSION "${_emt_torch_ver}")
    # The wheel's include/ also carries the third-party headers it was built with (fmt 11, protobuf, pybind11,
    # ...), which would shadow the system's copies that emt links (Debian's fmt 9): expose LibTorch's own
    # header trees only, through links in the build tree.
    set(_emt_torch_inc "${CMAKE_BINARY_DIR}/emt-torch-include")
    file(MAKE_DIRECTORY "${_emt_torch_inc}")
    foreach(_d ATen c10 caffe2 torch THC)
      file(REMOVE "${_emt_torch_inc}/${_d}")
      if(EXISTS "${_emt_torch_root}/include/${_d}")
        file(CREATE_LINK "${_emt_torch_root}/include/${_d}" "${_emt_torch_inc}/${_d}" SYMBOLIC)
      endif()
    endforeach()
    set(TORCH_INCLUDE_DIRS "${_emt_torch_inc}" "${_emt_torch_root}/include/torch/csrc/api/include")
    # Every LibTorch library is kept (--no-as-needed inside push/pop, as LibTorch's own package keeps them) even in
    # a program that calls none of its symbols directly: otherwise such a program loads whichever libc10.so the
    # system paths hold (Debian's 1.13 beside a 2.x wheel: "undefined symbol" at start-up).
    # One push/pop around the system libstdc++ (first, as above) and the full paths (so that CMake still puts
    # their directory on the build-tree RPATH); CMake drops a repeated flag item, so there is only one pair.
    set(_emt_torch_libs "-Wl,--push-state,--no-as-needed" "stdc++")
    foreach(_lib torch torch_cpu c10)
      unset(_emt_lib CACHE)
      find_library(_emt_lib ${_lib} PATHS "${_emt_torch_root}/lib" NO_DEFAULT_PATH)
      if(NOT _emt_lib)
        message(FATAL_ERROR "EMT_TORCH_IMPORT=libraries: lib${_lib}.so not found in ${_emt_torch_root}/lib")
      endif()
      list(APPEND _emt_torch_libs "${_emt_lib}")
    endforeach()
    set(EMT_TORCH_LIBDIR "${_emt_torch_root}/lib")
    set(EMT_TORCH_CUDA OFF)
    foreach(_lib torch_cuda c10_cuda)
      unset(_emt_lib CACHE)
      find_library(_emt_lib ${_lib} PATHS "${_emt_torch_root}/lib" NO_DEFAULT_PATH)
      if(_emt_lib)
        list(APPEND _emt_torch_libs "${_emt_lib}")
        set(EMT_TORCH_CUDA ON)
      endif()
    endforeach()
    unset(_emt_lib CACHE)
    list(APPEND _emt_torch_libs "-Wl,--pop-state")
    # The CUDA libraries that libtorch_cuda needs (cudart, cublas, cudnn, ...) are found through its own RPATH
    # when the program runs; the link step does not need to resolve them.
    if(EMT_TORCH_CUDA)
      list(APPEND _emt_torch_libs "-Wl,--allow-shlib-undefined")
    endif()
    set(_emt_torch_defs "")
    # LibTorch builds before 2.7 state their C++ ABI in TorchConfig.cmake; dependents must match it.
    file(STRINGS "${_emt_torch_cfg}" _emt_abi REGEX "_GLIBCXX_USE_CXX11_ABI=[01]")
    if(_emt_abi)
      string(REGEX REPLACE ".*_GLIBCXX_USE_CXX11_ABI=([01]).*" "\\1" _emt_abi "${_emt_abi}")
      set(_emt_torch_defs "_GLIBCXX_USE_CXX11_ABI=${_emt_abi}")
    endif()
    if(NOT TARGET emt::torch)
      add_library(emt::torch INTERFACE IMPORTED GLOBAL)
      set_target_properties(emt::torch PROPERTIES
        INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INCLUDE_DIRS}"
        INTERFACE_LINK_LIBRARIES "${_emt_torch_libs}"
        INTERFACE_COMPILE_DEFINITIONS "${_emt_torch_defs}")
    endif()
    set(TORCH_LIBRARIES emt::torch)
    set(Torch_FOUND TRUE)
    message(STATUS "emt: LibTorch ${Torch_VERSION} from ${_emt_torch_root} (libraries, CUDA libraries: ${EMT_TORCH_CUDA})")
  else()
    message(FATAL_ERROR "EMT_TORCH_IMPORT must be config or libraries, got '${EMT_TORCH_IMPORT}'")
  endif()
endmacro()
