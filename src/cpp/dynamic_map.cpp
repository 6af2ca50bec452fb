// The two dynamic maps of q8 state (dynamic_map.hpp), built by the compiler.
#include "dynamic_map.hpp"

namespace optkern {

constexpr SignedMap kSignedMapValue = dynamic_map_detail::make<6>(kSignedCodeBits, true);
constexpr UnsignedMap kUnsignedMapValue = dynamic_map_detail::make<7>(kUnsignedCodeBits, false);

extern const SignedMap kSignedMap = kSignedMapValue;
extern const UnsignedMap kUnsignedMap = kUnsignedMapValue;

}  // namespace optkern
